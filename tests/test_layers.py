"""The reference engine (``scratchvae.layers``), the learner's layers: each against central finite differences
(float64, relative error < 1e-6), the convolutions against naive loops, the Conv2d / ConvTranspose2d adjoint
identity, BatchNorm's modes and state dicts."""
import itertools

import numpy
import pytest
from naive import naive_conv2d, naive_conv_transpose2d, randn

from scratchvae import backend, layers
from scratchvae.gradcheck import GradcheckError, check_module

TOL = 1e-6  # maximum element-wise relative error accepted (see scratchvae.gradcheck)


MEASURED = {}  # layer case -> max relative error, printed at the end of the session for the issue note


def run_check(name, module, x, seed=1):
    report = check_module(module, x, backend.rng(seed), tol=TOL)
    MEASURED[name] = max(MEASURED.get(name, 0.0), max(report.values()))
    return report


@pytest.mark.parametrize("batch", [1, 3])
def test_linear_gradients(xp, f64, batch):
    layer = layers.Linear(5, 4, rng=backend.rng(2))
    report = run_check("Linear", layer, randn(xp, batch, 5))
    assert set(report) == {"x", "W", "b"}


CONV_CASES = [  # batch, (H, W), in, out, k, stride, padding
    (b, hw, 2, 3, k, s, p)
    for b, hw, k, s, p in itertools.product([1, 3], [(5, 7)], [3, 2], [1, 2], [0, 1])
] + [(2, (6, 6), 3, 1, 1, 1, 0), (1, (4, 5), 1, 2, (2, 3), 2, 1)]


@pytest.mark.parametrize("batch,hw,cin,cout,k,s,p", CONV_CASES)
def test_conv2d_gradients(xp, f64, batch, hw, cin, cout, k, s, p):
    layer = layers.Conv2d(cin, cout, k, stride=s, padding=p, rng=backend.rng(3))
    report = run_check("Conv2d", layer, randn(xp, batch, *hw, cin))
    assert set(report) == {"x", "W", "b"}


@pytest.mark.parametrize("batch,s,p,op", [
    (b, s, p, op) for b, s, p, op in itertools.product([1, 3], [1, 2], [0, 1], [0, 1]) if op < s
])
def test_conv_transpose2d_gradients(xp, f64, batch, s, p, op):
    layer = layers.ConvTranspose2d(3, 2, 3, stride=s, padding=p, output_padding=op, rng=backend.rng(4))
    run_check("ConvTranspose2d", layer, randn(xp, batch, 4, 3, 3))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (1, 3, 2, 3), (6, 4)])
def test_batchnorm_gradients(xp, f64, training, shape):
    layer = layers.BatchNorm2d(shape[-1])
    rng = backend.rng(5)
    layer.params["gamma"][...] = rng.standard_normal(shape[-1])
    layer.params["beta"][...] = rng.standard_normal(shape[-1])
    layer.buffers["running_mean"][...] = rng.standard_normal(shape[-1])
    layer.buffers["running_var"][...] = rng.random(shape[-1]) + 0.5
    layer.train(training)
    run_check(f"BatchNorm2d ({'train' if training else 'eval'})", layer, 2 * randn(xp, *shape) + 1)


@pytest.mark.parametrize("make", [lambda: layers.LeakyReLU(0.2), layers.ReLU, layers.Sigmoid, layers.Tanh,
                                  layers.Flatten, lambda: layers.Reshape(6, 5)])
def test_elementwise_and_shape_gradients(xp, f64, make):
    layer = make()
    x = randn(xp, 3, 5, 6)
    # keep inputs away from the ReLU kink, where a finite difference straddles two slopes
    x = xp.where(xp.abs(x) < 1e-3, 0.5, x)
    report = run_check(type(layer).__name__, layer, x)
    assert report["x"] <= TOL


def test_sequential_gradients(xp, f64):
    rng = backend.rng(6)
    net = layers.Sequential(
        layers.Conv2d(2, 4, 3, stride=2, padding=1, rng=rng), layers.BatchNorm2d(4), layers.LeakyReLU(),
        layers.Flatten(), layers.Linear(4 * 3 * 2, 5, rng=rng), layers.Tanh(),
        layers.Linear(5, 2 * 2 * 3, rng=rng), layers.Reshape(2, 2, 3),
        layers.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, rng=rng), layers.Sigmoid(),
    )
    report = run_check("Sequential", net, randn(xp, 3, 5, 4, 2))
    assert {"0.W", "1.gamma", "4.W", "8.b"} <= set(report)


def test_gradcheck_names_a_wrong_gradient(xp, f64):
    """The checker must fail, naming tensor and element, when backward is off."""
    layer = layers.Linear(3, 2, rng=backend.rng(7))
    good_backward = layer.backward

    def bad_backward(dy):
        dx = good_backward(dy)
        layer.grads["W"][1, 2] += 1e-3
        return dx

    layer.backward = bad_backward
    with pytest.raises(GradcheckError, match=r"W\[1, 2\]"):
        check_module(layer, randn(xp, 2, 3), backend.rng(1))


def test_gradcheck_refuses_float32(xp):
    layer = layers.Linear(3, 2, rng=backend.rng(7), dtype=numpy.float32)
    with pytest.raises(TypeError, match="float64"):
        check_module(layer, randn(xp, 2, 3).astype(numpy.float32), backend.rng(1))


@pytest.mark.parametrize("s,p", [(1, 0), (1, 1), (2, 0), (2, 1)])
def test_conv2d_forward_matches_naive_loop(xp, f64, s, p):
    layer = layers.Conv2d(3, 4, 3, stride=s, padding=p, rng=backend.rng(8))
    x = randn(xp, 2, 6, 7, 3)
    got = backend.to_host(layer.forward(x))
    want = naive_conv2d(backend.to_host(x), backend.to_host(layer.params["W"]),
                        backend.to_host(layer.params["b"]), s, p)
    assert got.shape == want.shape
    numpy.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("s,p,op", [(1, 0, 0), (1, 1, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)])
def test_conv_transpose2d_forward_matches_naive_loop(xp, f64, s, p, op):
    layer = layers.ConvTranspose2d(3, 4, 3, stride=s, padding=p, output_padding=op, rng=backend.rng(9))
    x = randn(xp, 2, 3, 4, 3)
    got = backend.to_host(layer.forward(x))
    want = naive_conv_transpose2d(backend.to_host(x), backend.to_host(layer.params["W"]),
                                  backend.to_host(layer.params["b"]), s, p, op)
    assert got.shape == want.shape
    numpy.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("s,p,hw", [(1, 1, (5, 6)), (2, 1, (6, 8)), (2, 0, (7, 5)), (2, 1, (5, 5)), (1, 0, (4, 6))])
def test_conv_transpose_is_adjoint_of_conv(xp, f64, s, p, hw):
    """<Conv2d(x), y> == <x, ConvTranspose2d(y)> when both share W (and have no bias)."""
    conv = layers.Conv2d(3, 5, 3, stride=s, padding=p, bias=False, rng=backend.rng(10))
    x = randn(xp, 2, *hw, 3, seed=11)
    cx = conv.forward(x)
    # output_padding gives back the rows the floor in Conv2d's output size dropped (the same along H and W here)
    op = hw[0] - ((cx.shape[1] - 1) * s - 2 * p + 3)
    tconv = layers.ConvTranspose2d(5, 3, 3, stride=s, padding=p, output_padding=op, bias=False)
    tconv.params["W"][...] = conv.params["W"]  # Conv2d W (out=5, in=3, k, k) is ConvTranspose2d W (in=5, out=3, k, k)
    y = randn(xp, *cx.shape, seed=12)
    ty = tconv.forward(y)
    assert ty.shape == x.shape
    assert float(xp.sum(cx * y)) == pytest.approx(float(xp.sum(x * ty)), rel=1e-12)
    # and ConvTranspose2d's forward is exactly Conv2d's input gradient
    conv.zero_grad()
    numpy.testing.assert_allclose(backend.to_host(ty), backend.to_host(conv.backward(y)), atol=1e-12)


def test_batchnorm_train_normalises_and_updates_running_stats(xp, f64):
    bn = layers.BatchNorm2d(3, momentum=0.1)
    x = 3 * randn(xp, 4, 5, 6, 3) + 2
    y = backend.to_host(bn.forward(x))
    numpy.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-12)
    numpy.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1, rtol=1e-4)  # eps=1e-5 shrinks it a little
    xh = backend.to_host(x).reshape(-1, 3)
    numpy.testing.assert_allclose(backend.to_host(bn.buffers["running_mean"]), 0.1 * xh.mean(0), rtol=1e-12)
    numpy.testing.assert_allclose(backend.to_host(bn.buffers["running_var"]),
                                  0.9 + 0.1 * xh.var(0, ddof=1), rtol=1e-12)


def test_batchnorm_takes_non_contiguous_arrays(xp, f64):
    """A strided view in, and a strided gradient back: the same results as for contiguous copies."""
    big = randn(xp, 4, 5, 6, 6, seed=30)
    x = big[..., ::2]  # every other channel: not contiguous
    dy = randn(xp, 4, 5, 6, 6, seed=31)[..., 1::2]
    results = []
    for a, g in ((x, dy), (xp.ascontiguousarray(x), xp.ascontiguousarray(dy))):
        bn = layers.BatchNorm2d(3)
        bn.params["gamma"][...] = xp.asarray([0.5, 2.0, -1.0])
        results.append([backend.to_host(v).copy() for v in (bn.forward(a), bn.backward(g), bn.grads["gamma"])])
    for got, want in zip(*results):
        numpy.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_batchnorm_eval_uses_running_stats(xp, f64):
    bn = layers.BatchNorm2d(2)
    bn.buffers["running_mean"][...] = xp.asarray([1.0, -2.0])
    bn.buffers["running_var"][...] = xp.asarray([4.0, 0.25])
    bn.params["gamma"][...] = xp.asarray([2.0, 1.0])
    bn.eval()
    x = randn(xp, 3, 2, 2, 2)
    want = (backend.to_host(x) - [1.0, -2.0]) / numpy.sqrt(numpy.array([4.0, 0.25]) + 1e-5) * [2.0, 1.0]
    numpy.testing.assert_allclose(backend.to_host(bn.forward(x)), want, rtol=1e-12)
    # eval-mode output does not depend on the rest of the batch
    numpy.testing.assert_allclose(backend.to_host(bn.forward(x[:1])), want[:1], rtol=1e-12)


def test_state_dict_round_trip_includes_running_stats(xp, f64):
    def make(seed):
        rng = backend.rng(seed)
        return layers.Sequential(layers.Conv2d(2, 3, 3, padding=1, rng=rng), layers.BatchNorm2d(3),
                                 layers.Flatten(), layers.Linear(3 * 4 * 4, 2, rng=rng))
    a, b = make(1), make(2)
    a.forward(randn(xp, 5, 4, 4, 2))  # moves BatchNorm's running statistics away from their init
    state = {k: backend.to_host(v).copy() for k, v in a.state_dict().items()}
    assert "1.running_mean" in state and "1.running_var" in state and "0.W" in state
    b.load_state_dict(state)
    a.eval(), b.eval()
    x = randn(xp, 2, 4, 4, 2, seed=3)
    numpy.testing.assert_array_equal(backend.to_host(a.forward(x)), backend.to_host(b.forward(x)))
    with pytest.raises(ValueError, match="0.W"):
        b.load_state_dict({**state, "0.W": numpy.zeros((1, 2, 3, 3))})
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({k: v for k, v in state.items() if k != "3.b"})


def test_conv_rejects_wrong_channel_count(xp):
    with pytest.raises(ValueError, match="NHWC"):
        layers.Conv2d(3, 4, 3).forward(xp.zeros((1, 3, 8, 8), dtype=numpy.float32))


def test_default_init_matches_pytorch_fan_in_bounds(xp):
    conv = layers.Conv2d(8, 16, 3, rng=backend.rng(0))
    tconv = layers.ConvTranspose2d(8, 16, 3, rng=backend.rng(0))
    w, tw = backend.to_host(conv.params["W"]), backend.to_host(tconv.params["W"])
    assert conv.params["W"].dtype == numpy.float32
    assert numpy.abs(w).max() <= 1 / numpy.sqrt(8 * 9) and numpy.abs(w).max() > 0.9 / numpy.sqrt(8 * 9)
    assert numpy.abs(tw).max() <= 1 / numpy.sqrt(16 * 9) and numpy.abs(tw).max() > 0.9 / numpy.sqrt(16 * 9)
    assert tw.shape == (8, 16, 3, 3)


@pytest.mark.parametrize("make,shape", [
    (lambda: layers.Conv2d(3, 4, 3, stride=2, padding=1, rng=backend.rng(15)), (2, 7, 6, 3)),
    (lambda: layers.Conv2d(4, 2, 3, stride=1, padding=1, rng=backend.rng(15)), (2, 5, 6, 4)),
    (lambda: layers.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, rng=backend.rng(15)), (2, 3, 4, 3)),
    (lambda: layers.Linear(5, 3, rng=backend.rng(15)), (4, 5)),
])
def test_input_grad_false_skips_dx_only(xp, f64, make, shape):
    """A first layer (fed data) may skip dL/dx; its parameter gradients must not change."""
    x = randn(xp, *shape, seed=16)
    grads = []
    for input_grad in (True, False):
        layer = make()
        layer.input_grad = input_grad
        y = layer.forward(x)
        dx = layer.backward(randn(xp, *y.shape, seed=17))
        assert (dx is None) == (not input_grad)
        grads.append({k: backend.to_host(g).copy() for k, g in layer.grads.items()})
    for k in grads[0]:
        numpy.testing.assert_array_equal(grads[0][k], grads[1][k])


@pytest.mark.parametrize("slope", [0.01, 0.2, 0.0])
def test_leaky_relu_matches_definition_at_and_around_zero(xp, slope):
    """y = x for x > 0, slope x otherwise; dy/dx = 1 for x > 0 and slope for x <= 0 (PyTorch's choice at 0)."""
    x = xp.asarray(numpy.array([[-2.0, -1e-30, 0.0, -0.0, 1e-30, 3.0]], dtype=numpy.float32))
    dy = xp.asarray(numpy.array([[1.0, 2.0, 3.0, 4.0, 5.0, -6.0]], dtype=numpy.float32))
    layer = layers.LeakyReLU(slope)
    y, dx = backend.to_host(layer.forward(x)), backend.to_host(layer.backward(dy))
    xh, dyh = backend.to_host(x), backend.to_host(dy)
    numpy.testing.assert_array_equal(y, numpy.where(xh > 0, xh, numpy.float32(slope) * xh))
    numpy.testing.assert_array_equal(dx, numpy.where(xh > 0, dyh, numpy.float32(slope) * dyh))
    assert dx.dtype == numpy.float32


def test_leaky_relu_slope_must_lie_in_unit_interval():
    with pytest.raises(ValueError, match="slope"):
        layers.LeakyReLU(1.5)
    with pytest.raises(ValueError, match="slope"):
        layers.LeakyReLU(-0.1)


def test_batchnorm_statistics_are_accurate_in_float32(xp):
    """A large float32 batch whose mean is far from zero: mean and variance within 1e-5 of float64 ones."""
    x64 = 1000.0 + 0.5 * numpy.random.default_rng(24).standard_normal((64, 32, 32, 4))
    bn = layers.BatchNorm2d(4, momentum=1.0)  # the running estimates become the batch's own
    bn.forward(xp.asarray(x64.astype(numpy.float32)))
    mean, var = x64.reshape(-1, 4).mean(axis=0), x64.reshape(-1, 4).var(axis=0, ddof=1)
    numpy.testing.assert_allclose(backend.to_host(bn.buffers["running_mean"]), mean, rtol=1e-6)
    numpy.testing.assert_allclose(backend.to_host(bn.buffers["running_var"]), var, rtol=1e-3)


def test_sigmoid_matches_the_logistic_function_without_overflow(xp):
    x = numpy.array([-1e4, -100.0, -88.5, -80.0, -3.0, 0.0, 2.5, 100.0, 1e4], dtype=numpy.float32)
    x = numpy.concatenate([x, numpy.linspace(-40, 40, 801, dtype=numpy.float32)])
    with numpy.errstate(all="raise"):  # an exp(1e4), or a subnormal result, anywhere would raise
        got = backend.to_host(layers.sigmoid(xp.asarray(x)))
    with numpy.errstate(over="ignore"):
        want = 1 / (1 + numpy.exp(-x.astype(numpy.float64)))
    numpy.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


def test_report_measured_errors(capsys):
    """Prints the largest relative error each layer reached (collected by the checks above)."""
    with capsys.disabled():
        for name, err in sorted(MEASURED.items()):
            print(f"\n  gradcheck max relative error  {name:28s} {err:.2e}", end="")
        print()
    assert all(err <= TOL for err in MEASURED.values())
