"""The fast engine's VAE (``FastVAE``, what ``VAE(engine="fast")`` builds): its GPU path, run on the tests' stand-in
device, against its CPU path."""
import contextlib

import numpy
import pytest

from scratchvae import backend, fast
from scratchvae.fast import activations, norm, optim
from scratchvae.vae import VAE


def randn(*shape, seed=0):
    return numpy.random.default_rng(seed).standard_normal(shape)


def host(a):
    return backend.to_host(a)


@pytest.mark.parametrize("kw", [{}, {"recon": "bce", "mc_samples": 2}])
def test_gpu_code_path_gives_the_cpu_numbers(f64, monkeypatch, kw):
    """Training steps on the tests' stand-in device, where the layers take their GPU branches (each elementwise
    operation over a whole array at once, the kernels of ``scratchvae.fast.kernels``), give the losses, gradients,
    parameters and BatchNorm statistics of the CPU branches, here run in pieces of a few rows (float64)."""
    from strict_device import use_strict_device  # noqa: PLC0415

    for module in (norm, activations, optim):  # many pieces on the CPU, so that both branches are really different
        monkeypatch.setattr(module, "PIECE", 50)
    images = backend.rng(40).random((5, 3, 16, 16))
    noise = [randn(kw.get("mc_samples", 1), 5, 4, seed=41 + step) for step in range(2)]

    def train(to_device):
        model = VAE(image_size=16, preset="tiny", seed=3, **kw)
        model.load_state_dict({k: to_device(host(v)) for k, v in host_start.items()})
        optimizer = model.make_optimizer(lr=1e-2)
        logs = [model.train_step(to_device(images), optimizer, eps=to_device(eps)) for eps in noise]
        grads = {name: host(g) for name, _, g in model.named_parameters()}
        return logs, grads, {k: host(v) for k, v in model.state_dict().items()}

    monkeypatch.setitem(backend._state, "xp", numpy)  # the CPU, for this test only
    model_layout = VAE(image_size=16, preset="tiny", seed=3, **kw)
    host_start = model_layout.state_dict()
    want = train(numpy.asarray)
    with use_strict_device() as dev:
        got = train(dev.asarray)
        assert all(backend.is_device_array(p) for _, p, _ in VAE(image_size=16, preset="tiny").named_parameters())
    for got_logs, want_logs in zip(got[0], want[0]):
        for key in want_logs:
            assert got_logs[key] == pytest.approx(want_logs[key], rel=1e-12), key
    # a conv bias that feeds a BatchNorm gets a gradient of pure rounding noise (1e-16 to 1e-14: BatchNorm
    # subtracts the mean), which Adam divides by its eps = 1e-8: such biases, and the running means after
    # them, then differ by up to about 1e-8 between any two orders of summation; everything else agrees to 1e-12
    noisy = {name for seq in ("encoder", "decoder") for i, layer in enumerate(getattr(model_layout, seq))
             if isinstance(layer, fast.BatchNorm2d) for name in (f"{seq}.{i - 1}.b", f"{seq}.{i}.running_mean")}
    assert noisy & set(want[2]) and noisy <= set(want[2])
    for got_arrays, want_arrays in zip(got[1:], want[1:]):
        assert got_arrays.keys() == want_arrays.keys()
        for name in want_arrays:
            atol = 1e-7 if name in noisy and got_arrays is got[2] else 1e-12
            numpy.testing.assert_allclose(got_arrays[name], want_arrays[name], rtol=1e-9, atol=atol, err_msg=name)
    assert any(not numpy.array_equal(want[2][k], host(v)) for k, v in host_start.items())  # the steps changed them


def _trained(seed=3, steps=2):
    model = VAE(image_size=16, preset="tiny", seed=seed)
    optimizer = model.make_optimizer(lr=1e-2)
    images = backend.rng(50 + seed).random((3, 3, 16, 16)).astype(numpy.float32)
    for step in range(steps):
        model.train_step(images, optimizer, rng=backend.rng((seed, step)))
    return model, optimizer, images


def test_layers_share_their_scratch_and_take_turns_with_input_gradients():
    """A FastVAE's layers keep no column matrices or input gradients of their own: the model holds one scratch
    array of each kind, and two input gradients that every layer writes in turn; and BatchNorm keeps x - mean
    in the convolution's output before it."""
    model, _, _ = _trained()
    layers = [m for _, m in model.named_modules() if isinstance(m, fast.workspace.Workspace)]
    arena = layers[0]._arena
    assert all(m._arena is arena for m in layers)
    own = {name for m in layers for name in m.__dict__.get("_work", {})}
    assert "output y" in own and not own & {"subpixel_col", "dcol", "phase", "output dx", "xc"}, own
    assert sorted(key[0] for key in arena if isinstance(key, tuple) and key[0].startswith("dx")) == ["dx 0", "dx 1"]


def test_two_models_trained_in_turn_train_as_each_alone():
    """Each model (and each copy) has its own scratch: training two in turn gives each one's numbers alone."""
    import copy  # noqa: PLC0415

    alone = [_trained(seed, steps=3)[0].state_dict() for seed in (3, 4)]
    a, opt_a, x_a = _trained(3, steps=0)
    b, opt_b, x_b = _trained(4, steps=0)
    for step in range(3):
        a.train_step(x_a, opt_a, rng=backend.rng((3, step)))
        b.train_step(x_b, opt_b, rng=backend.rng((4, step)))
    clone = copy.deepcopy(a)
    arenas = [m.encoder.layers[0]._arena for m in (a, b, clone)]
    assert arenas[0] is not arenas[1] and arenas[2] is not arenas[0]
    assert all(m._arena is arenas[2] for _, m in clone.named_modules() if isinstance(m, fast.workspace.Workspace))
    for want, model in zip(alone, (a, b)):
        got = model.state_dict()
        assert [k for k in want if not numpy.array_equal(want[k], got[k])] == []


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_over_its_input_gives_the_same_numbers(training):
    """``overwrite_input``: the same output, gradients and statistics, bit for bit; x then holds x - mean."""
    x0 = randn(3, 5, 6, 4, seed=7).astype(numpy.float32) * 2 + 1
    dy = randn(3, 5, 6, 4, seed=8).astype(numpy.float32)

    def run(overwrite):
        bn, act, x = fast.BatchNorm2d(4), fast.LeakyReLU(0.1), x0.copy()
        bn.training = training
        y = bn.forward(x, activation=act, overwrite_input=overwrite).copy()
        dx = bn.backward(dy).copy()
        return x, [y, dx, bn.grads["gamma"], bn.grads["beta"], bn.buffers["running_mean"], bn.buffers["running_var"]]

    (x_kept, want), (x_used, got) = run(False), run(True)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
    assert x_kept.tobytes() == x0.tobytes()
    mean = x0.reshape(-1, 4).mean(axis=0) if training else 0
    numpy.testing.assert_allclose(x_used, x0 - mean, atol=1e-5)


@pytest.mark.parametrize("middle", [[], ["leaky"], ["sigmoid"], ["bn", "leaky"]])
def test_a_sequential_recycling_its_outputs_gives_the_numbers_of_one_that_does_not(middle):
    """BatchNorm keeps x - mean over its input only after a convolution: after an activation (or a BatchNorm with
    one), whose backward reads its own output, it keeps its own copy, and every gradient stays right."""
    make = {"leaky": lambda: fast.LeakyReLU(0.1), "sigmoid": fast.Sigmoid, "bn": lambda: fast.BatchNorm2d(4)}
    x = randn(3, 6, 6, 2, seed=20).astype(numpy.float32)
    dy = randn(3, 6, 6, 4, seed=21).astype(numpy.float32)

    def run(recycle):
        seq = fast.Sequential(fast.Conv2d(2, 4, 3, padding=1, rng=backend.rng(22)), *[make[m]() for m in middle],
                              fast.BatchNorm2d(4))
        with fast.workspace.recycling_outputs(seq) if recycle else contextlib.nullcontext():
            y = seq.forward(x).copy()
            dx = seq.backward(dy).copy()
        return [y, dx] + [g.copy() for _, _, g in seq.named_parameters()]

    want, got = run(False), run(True)
    assert [g.tobytes() for g in got] == [w.tobytes() for w in want]
