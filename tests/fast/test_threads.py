"""The fast engine's threads (``scratchvae.fast.threads``): every result bit-for-bit that of one thread."""
import itertools
import multiprocessing
import threading
import time

import numpy
import pytest

from scratchvae import backend, fast
from scratchvae.fast import activations, conv, norm, optim, threads
from scratchvae.vae import VAE

# the modules whose PIECE sets the pieces the threads share out; a small one makes many pieces of small arrays
PIECED = (norm, activations, optim, conv)


@pytest.fixture
def restore_threads():
    before = threads.get_threads()
    yield
    threads.set_threads(before)


@pytest.fixture
def small_pieces(monkeypatch):
    for module in PIECED:
        monkeypatch.setattr(module, "PIECE", 300)


def on_threads(n, fn):
    """``fn()`` with the fast engine on n threads."""
    threads.set_threads(n)
    return fn()


def test_each_piece_keeps_piece_order_and_uses_the_threads(restore_threads):
    a = numpy.arange(40.0).reshape(20, 2)
    out = numpy.zeros_like(a)
    seen = set()

    def double(a_p, out_p):
        seen.add(threading.current_thread().name)
        numpy.multiply(a_p, 2, out=out_p)
        return a_p[0, 0]

    threads.set_threads(3)
    firsts = threads.each_piece(double, a, out, size=4)  # pieces of 2 rows: 10 pieces over 3 threads
    assert firsts == [float(4 * i) for i in range(10)]
    numpy.testing.assert_array_equal(out, 2 * a)
    assert len(seen) == 3, seen
    threads.set_threads(1)
    seen.clear()
    assert threads.each_piece(double, a, out, size=4) == firsts
    assert seen == {threading.current_thread().name}


def test_fewer_pieces_than_threads_and_one_piece(restore_threads):
    threads.set_threads(4)
    a = numpy.arange(6.0).reshape(3, 2)
    assert threads.each_piece(lambda p: p.sum(), a, size=2) == [1.0, 5.0, 9.0]
    assert threads.each_piece(lambda p: p.sum(), a, size=100) == [15.0]


def test_an_error_in_any_piece_reaches_the_caller_after_every_thread_is_done(restore_threads):
    threads.set_threads(2)
    a = numpy.arange(10.0).reshape(10, 1)
    finished = []

    def work(p):
        if p[0, 0] == 1:  # the calling thread's run (pieces 0-4) fails early
            raise ArithmeticError("piece 1")
        time.sleep(0.02)
        finished.append(float(p[0, 0]))

    with pytest.raises(ArithmeticError, match="piece 1"):
        threads.each_piece(work, a, size=1)
    # by then the other thread's run (pieces 5-9, slow) is all done: nothing writes on after the error
    assert sorted(finished) == [0.0, 5.0, 6.0, 7.0, 8.0, 9.0]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_threads_refuses_what_is_not_a_count(bad, restore_threads):
    with pytest.raises(ValueError, match="whole number"):
        threads.set_threads(bad)


@pytest.mark.parametrize("value", ["0", "two", "-3"])
def test_a_bad_threads_variable_says_what_to_give(value, monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, value)
    with pytest.raises(ValueError, match="SCRATCHVAE_THREADS.*whole number"):
        threads.default_threads()


def test_default_threads(monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, "3")
    assert threads.default_threads() == 3
    monkeypatch.delenv(threads.ENV_VAR)
    monkeypatch.setattr(threads, "OPENBLAS_SPIN_SET", True)
    assert 1 <= threads.default_threads() <= threads.MAX_THREADS
    # NumPy loaded before scratchvae, with OpenBLAS's spin unset: one thread, which does not wait on OpenBLAS's
    monkeypatch.setattr(threads, "OPENBLAS_SPIN_SET", False)
    assert threads.default_threads() == 1


def _count_in_child(queue):
    a = numpy.arange(8.0).reshape(8, 1)
    queue.put(threads.each_piece(lambda p: float(p.sum()), a, size=1))


def test_a_forked_child_makes_its_own_pool(restore_threads):
    threads.set_threads(2)
    threads.each_piece(lambda p: None, numpy.zeros((4, 1)), size=1)  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_count_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the child hung or failed on its inherited pool"
    assert queue.get(timeout=5) == [float(i) for i in range(8)]


# ---- bit for bit: the threaded layers against one thread -----------------------------------------------

def randn(*shape, seed=0, dtype=numpy.float32):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_activation", [True, False])
def test_batchnorm_is_the_same_on_any_number_of_threads(dtype, training, with_activation, small_pieces,
                                                        restore_threads):
    x, dy = randn(3, 5, 7, 6, seed=1, dtype=dtype) * 3 + 2, randn(3, 5, 7, 6, seed=2, dtype=dtype)

    def run():
        bn, act = fast.BatchNorm2d(6), fast.LeakyReLU(0.1)
        bn.params["gamma"][...] = randn(6, seed=3, dtype=dtype)
        bn.training = training
        y = bn.forward(x, activation=act if with_activation else None).copy()
        dx = bn.backward(dy).copy()
        return [y, dx, bn.grads["gamma"], bn.grads["beta"], bn.buffers["running_mean"], bn.buffers["running_var"]]

    one = on_threads(1, run)
    for n in (2, 3):
        for got, want in zip(on_threads(n, run), one):
            assert got.tobytes() == want.tobytes(), f"{n} threads differ from one"


@pytest.mark.parametrize("layer", ["leaky", "sigmoid"])
def test_activations_are_the_same_on_any_number_of_threads(layer, small_pieces, restore_threads):
    x = randn(4, 3, 9, 5, seed=4).transpose(0, 2, 3, 1)  # an NHWC view of NCHW memory, as the images are
    dy = randn(4, 9, 5, 3, seed=5)

    def run():
        act = fast.LeakyReLU(0.2) if layer == "leaky" else fast.Sigmoid()
        return [act.forward(x).copy(), act.backward(dy).copy()]

    one = on_threads(1, run)
    got = on_threads(2, run)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in one]


@pytest.mark.parametrize("kind, shape, kwargs", [
    ("conv", (3, 9, 11, 4), {"stride": 2, "padding": 1}),
    ("conv", (5, 8, 8, 6), {"stride": 1, "padding": 1}),  # fewer outputs than inputs: multiply first, then shift
    ("conv", (2, 8, 8, 1), {"stride": 1, "padding": 2}),
    ("transposed", (3, 5, 7, 4), {"stride": 2, "padding": 1, "output_padding": 1}),
    ("transposed", (2, 6, 6, 3), {"stride": 3, "padding": 0}),
])
def test_convolutions_are_the_same_on_any_number_of_threads(kind, shape, kwargs, small_pieces, restore_threads):
    x = randn(*shape, seed=6)

    def run():
        layer = (fast.Conv2d if kind == "conv" else fast.ConvTranspose2d)(shape[-1], 5, 3, **kwargs)
        y = layer.forward(x).copy()
        dx = layer.backward(randn(*y.shape, seed=7)).copy()
        return [y, dx, layer.grads["W"], layer.grads["b"]]

    one = on_threads(1, run)
    got = on_threads(2, run)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in one]


def test_adam_is_the_same_on_any_number_of_threads(small_pieces, restore_threads):
    def run():
        p = randn(40, 30, seed=8)
        opt = optim.Adam([("w", p, randn(40, 30, seed=9))], lr=1e-2, weight_decay=0.01)
        for _ in range(3):
            opt.step()
        return p

    assert on_threads(2, run).tobytes() == on_threads(1, run).tobytes()


def test_training_steps_are_the_same_on_any_number_of_threads(small_pieces, restore_threads):
    """Three training steps of the whole VAE: every log, parameter, moment and statistic, bit for bit."""
    images = backend.rng(10).random((3, 3, 16, 16)).astype(numpy.float32)

    def run():
        model = VAE(image_size=16, preset="tiny", seed=2)
        optimizer = model.make_optimizer(lr=1e-2)
        logs = [model.train_step(images, optimizer, rng=backend.rng(20 + step)) for step in range(3)]
        arrays = {k: backend.to_host(v) for k, v in model.state_dict().items()}
        arrays.update({k: backend.to_host(v) for k, v in optimizer.state_dict().items() if hasattr(v, "shape")})
        return logs, arrays

    want_logs, want = on_threads(1, run)
    for n in (2, 4):
        logs, got = on_threads(n, run)
        assert logs == want_logs
        assert got.keys() == want.keys()
        assert [k for k in want if got[k].tobytes() != want[k].tobytes()] == [], f"{n} threads"


@pytest.mark.parametrize("samples", [1, 3])
def test_the_squared_error_is_the_reference_one_on_any_number_of_threads(samples, small_pieces, restore_threads,
                                                                          monkeypatch):
    """The fast engine's squared error (``fast.recon``): the reference's numbers, bit for bit, on 1 to 3 threads."""
    from scratchvae import vae  # noqa: PLC0415
    from scratchvae.fast import recon  # noqa: PLC0415

    monkeypatch.setattr(recon, "PIECE", 300)
    x = numpy.random.default_rng(11).random((5, 3, 7, 9)).astype(numpy.float32)
    out = numpy.random.default_rng(12).random((samples, 5, 3, 7, 9)).astype(numpy.float32)
    dnll = numpy.random.default_rng(13).random((samples, 5)).astype(numpy.float32)
    reference = vae.SquaredError()
    want = [reference.nll(x, out), reference.nll_backward(dnll, x, out)]
    for n in (1, 2, 3):
        threads.set_threads(n)
        fast_term = recon.SquaredError()
        got = [fast_term.nll(x, out), fast_term.nll_backward(dnll, x, out)]
        assert [g.tobytes() for g in got] == [w.tobytes() for w in want], f"{n} threads"
    assert type(VAE(image_size=16, preset="tiny").recon) is recon.SquaredError
    assert type(VAE(image_size=16, preset="tiny", engine="reference").recon) is vae.SquaredError


def test_set_threads_from_another_thread_loses_no_piece(restore_threads):
    """``each_piece`` hands its runs to the pool it counted them for, while another thread resizes the pool."""
    stop = threading.Event()

    def resize():
        sizes = itertools.cycle([2, 3, 1, 4])
        while not stop.is_set():
            threads.set_threads(next(sizes))

    a = numpy.arange(60.0).reshape(30, 2)
    resizer = threading.Thread(target=resize, daemon=True)
    resizer.start()
    try:
        for _ in range(300):
            out = numpy.zeros_like(a)
            threads.each_piece(lambda a_p, out_p: numpy.multiply(a_p, 2, out=out_p), a, out, size=4)
            numpy.testing.assert_array_equal(out, 2 * a)
    finally:
        stop.set()
        resizer.join(timeout=10)


def test_the_callers_errstate_holds_on_every_thread(restore_threads):
    """An overflow on a worker's piece raises under the caller's ``numpy.errstate(all="raise")``, as on its own."""
    threads.set_threads(2)
    a = numpy.ones((8, 4), dtype=numpy.float32)
    a[-1] = 3e38  # in the last piece: the worker's run

    def double(a_p):
        return a_p * numpy.float32(2)

    with numpy.errstate(all="raise"), pytest.raises(FloatingPointError):
        threads.each_piece(double, a, size=4)


def test_scratch_does_not_grow_with_the_threads_that_train(restore_threads):
    """Steps run from several threads in turn share the caller's scratch: one per layer, not one per thread."""
    threads.set_threads(2)
    model = VAE(image_size=16, preset="tiny", seed=2)
    optimizer = model.make_optimizer()
    images = backend.rng(10).random((3, 3, 16, 16)).astype(numpy.float32)
    for step in range(4):
        runner = threading.Thread(target=model.train_step, args=(images, optimizer), kwargs={"rng": backend.rng(step)})
        runner.start()
        runner.join()
    names = {name for _, m in model.named_modules() for name in m.__dict__.get("_work", {}) if name.startswith("piece")}
    assert names <= {"piece caller", "piece scratchvae-1"}, names
    assert set(optimizer._scratch) <= {"caller", "scratchvae-1"}


def test_the_squared_error_keeps_one_scratch_array_per_thread(small_pieces, restore_threads, monkeypatch):
    """Pieces of two lengths (a shorter last one) share one scratch array a thread: none made anew per call."""
    from scratchvae.fast import recon  # noqa: PLC0415

    monkeypatch.setattr(recon, "PIECE", 2 * 3 * 7 * 9)  # two images a piece: 2 + 2 + 1 of five
    threads.set_threads(2)
    x = numpy.random.default_rng(11).random((5, 3, 7, 9)).astype(numpy.float32)
    out = numpy.random.default_rng(12).random((1, 5, 3, 7, 9)).astype(numpy.float32)
    term = recon.SquaredError()
    term.nll(x, out)
    arrays = {name: entry[1] for name, entry in term._work.items()}
    term.nll(x, out)
    assert arrays and all(term._work[name][1] is a for name, a in arrays.items())
