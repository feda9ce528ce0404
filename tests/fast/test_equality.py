"""The fast engine against the reference engine: every layer on a wide grid of shapes, and the whole VAE.

Each fast layer subclasses its reference layer and must give the same numbers: forward, dL/dx, every parameter
gradient (accumulated over two backward calls) and BatchNorm's running statistics, to 1e-12 relative in
float64 and 1e-5 in float32 (relative to each array's largest value, see ``assert_same``), on NumPy, on the tests' stand-in device
(the GPU path's branches and CUDA kernels, compiled for the CPU), and on a GPU where one is usable.
"""
import contextlib
import itertools

import numpy
import pytest

from scratchvae import backend, fast, layers
from scratchvae.vae import VAE

TOL = {numpy.float64: 1e-12, numpy.float32: 1e-5}
DEVICES = ["cpu", "stand-in", pytest.param("gpu", marks=pytest.mark.gpu)]
DTYPES = [numpy.float64, numpy.float32]


@contextlib.contextmanager
def on_device(name):
    """The array module of device ``name`` as the backend's device for the block (the CPU's NumPy otherwise)."""
    from strict_device import use_strict_device  # noqa: PLC0415

    if name == "gpu" and not backend.gpu_available():
        pytest.skip("no usable GPU/CuPy")
    saved = backend._state["xp"]
    try:
        if name == "stand-in":
            with use_strict_device() as dev:
                yield dev
        else:
            yield backend.set_device(name)
    finally:
        backend._state["xp"] = saved


def assert_same(got, want, tol, what, floor=1.0):
    """Element-wise |got - want| <= tol * scale, the scale being the largest |want| of the array, or ``floor`` if
    that is smaller: the inputs and parameters are of order 1, and a sum of many of them that cancels down to
    a small number (a bias gradient of one channel) carries the roundings of its terms, not of its result."""
    got, want = backend.to_host(got), backend.to_host(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    scale = max(float(numpy.abs(want).max(initial=0.0)), floor)
    worst = float(numpy.abs(got.astype(numpy.float64) - want).max(initial=0.0)) / scale
    assert worst <= tol, f"{what}: differs by {worst:.2e} of its scale (allowed {tol:.0e})"


def host_random(shape, seed, dtype):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(dtype)


def as_input(xp, a, layout):
    """``a`` (NHWC) on the device: contiguous, or NCHW memory seen as NHWC (how the images enter the model)."""
    if layout == "nhwc" or a.ndim != 4:
        return xp.asarray(a)
    planes = xp.empty((a.shape[0], a.shape[3], a.shape[1], a.shape[2]), dtype=a.dtype)  # strides as a new array's
    planes[...] = xp.asarray(a.transpose(0, 3, 1, 2))
    return planes.transpose(0, 2, 3, 1)


def run_both(make, x, dys, xp, dtype, layout="nhwc", training=True, forward=None, seed=0):
    """Forward x and backward each dy (accumulating) through the reference layer ``make(layers)`` and the fast
    one ``make(fast)``, both given the same parameters and buffers; returns each one's arrays by name."""
    results = []
    for engine in (layers, fast):
        with backend.default_dtype(dtype):
            layer = make(engine)
        for i, (name, value) in enumerate(sorted(layer.state_dict().items())):
            value[...] = xp.asarray(host_random(value.shape, seed + 100 + i, dtype))
            if "var" in name:
                value[...] = xp.abs(value) + dtype(0.5)
        layer.train(training)
        y = layer.forward(as_input(xp, x, layout)) if forward is None else forward(layer, as_input(xp, x, layout))
        arrays = {"y": backend.to_host(y).copy()}
        for i, dy in enumerate(dys):
            dx = layer.backward(as_input(xp, dy, layout))
            arrays[f"dx (backward {i + 1})"] = None if dx is None else backend.to_host(dx).copy()
        arrays.update({f"d{name}": backend.to_host(g) for name, _, g in layer.named_parameters()})
        arrays.update({name: backend.to_host(b) for name, b in layer.named_buffers()})
        results.append(arrays)
    return results


def check_layer(make, x_shape, xp, dtype, case, layout="nhwc", training=True, dy_shape=None, seed=0):
    x = host_random(x_shape, seed, dtype)
    if dy_shape is None:  # the output's shape, from a reference layer
        with backend.default_dtype(dtype):
            dy_shape = make(layers).forward(xp.asarray(x)).shape
    dys = [host_random(dy_shape, seed + 1, dtype), host_random(dy_shape, seed + 2, dtype)]
    want, got = run_both(make, x, dys, xp, dtype, layout, training, seed=seed)
    assert want.keys() == got.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, f"{case}: {name}"
        else:
            assert_same(got[name], want[name], TOL[dtype], f"{case}: {name}")


def conv_cases():
    """(kernel, stride, padding, C_in, C_out, batch, (H, W), layout): every kernel 1-5 (and non-square ones),
    stride 1-3 and padding 0 to k-1, each with one of the channel counts, batches and layouts in turn, so that
    single-channel inputs and outputs, batch 1, odd and non-square images and NCHW views all meet every stride."""
    channels = [(1, 1), (1, 3), (3, 1), (4, 2), (2, 5), (3, 3)]  # (4, 2), (3, 1): multiply-first at stride 1
    kernels = [(k, k) for k in range(1, 6)] + [(2, 3), (3, 1), (1, 4), (5, 2)]
    variants = list(itertools.product(channels, ("nhwc", "nchw")))  # each pair of them comes round in turn
    geometries = [(k, s, p) for k, s in itertools.product(kernels, (1, 2, 3)) for p in range(min(k))]
    cases = []
    for j, (k, s, p) in enumerate(geometries):
        (cin, cout), layout = variants[j % len(variants)]
        batch, hw = (1, 2, 3)[j // 2 % 3], [(7, 9), (6, 6), (9, 5), (5, 8)][j // 3 % 4]
        cases.append((k, s, p, cin, cout, batch, hw, layout))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_fast_equals_reference(device, dtype):
    with on_device(device) as xp:
        for k, s, p, cin, cout, batch, (h, w), layout in conv_cases():
            for bias in (True, False) if k == (3, 3) else (True,):
                case = f"Conv2d {k} stride {s} pad {p} {cin}->{cout} batch {batch} {h}x{w} {layout} bias {bias}"
                check_layer(lambda L: L.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias),
                            (batch, h, w, cin), xp, dtype, case, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("device", DEVICES)
def test_conv_transpose2d_fast_equals_reference(device, dtype):
    with on_device(device) as xp:
        for k, s, p, cin, cout, batch, (h, w), layout in conv_cases():
            h, w = h // 2 + 1, w // 2 + 1
            for op in range(s):
                if min((h - 1) * s + k[0], (w - 1) * s + k[1]) - 2 * p + op < 1:
                    continue  # the padding would crop the whole output
                case = f"ConvTranspose2d {k} stride {s} pad {p} out-pad {op} {cin}->{cout} batch {batch} {h}x{w} {layout}"
                check_layer(lambda L: L.ConvTranspose2d(cin, cout, k, stride=s, padding=p, output_padding=op,
                                                        bias=(op + p) % 2 == 0),
                            (batch, h, w, cin), xp, dtype, case, layout)


def test_the_conv_grid_covers_what_the_issue_names():
    cases = conv_cases()
    assert {k for k, *_ in cases} >= {(k, k) for k in range(1, 6)}
    assert {(s, p) for _, s, p, *_ in cases} >= {(s, p) for s in (1, 2, 3) for p in range(5)}
    assert {(cin, cout) for _, _, _, cin, cout, *_ in cases} >= {(1, 1), (1, 3), (3, 1)}
    assert {batch for *_, batch, _, _ in cases} >= {1} and {layout for *_, layout in cases} == {"nhwc", "nchw"}
    assert any(s == 1 and cout < cin for _, s, _, cin, cout, *_ in cases)  # the multiply-first path
    # one input channel seen through NCHW memory, with kernel windows wider than one pixel
    assert any(cin == 1 and layout == "nchw" and k[1] > 1 for k, _, _, cin, *_, layout in cases)


BN_SHAPES = [(3, 4, 5, 2), (1, 3, 2, 1), (2, 5, 7, 3), (6, 4), (1, 1, 1, 4), (4, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_fast_equals_reference_alone_and_with_its_activation(device, dtype, training):
    """BatchNorm2d alone, and the fast one with its LeakyReLU (or ReLU) fused in against the reference's two
    layers in a row: on images, vectors, one channel, one pixel, batch 1, and NCHW views."""
    with on_device(device) as xp:
        for shape, activation in itertools.product(BN_SHAPES, (None, 0.2, 0.0)):
            c = shape[-1]
            if shape == (4, 1) and training:
                continue  # one channel of four numbers: fine; one number per channel in train mode has no variance
            for layout in ("nhwc", "nchw") if len(shape) == 4 else ("nhwc",):
                case = f"BatchNorm2d {shape} {layout} activation {activation} {'train' if training else 'eval'}"
                if activation is None:
                    check_layer(lambda L: L.BatchNorm2d(c), shape, xp, dtype, case, layout, training)
                else:
                    check_layer(lambda L: L.Sequential(L.BatchNorm2d(c), L.LeakyReLU(activation)), shape, xp, dtype,
                                case, layout, training)


def test_the_fast_sequential_really_fuses_the_activation():
    """(Otherwise the check above would compare two unfused pairs.)"""
    net = fast.Sequential(fast.BatchNorm2d(2), fast.LeakyReLU(0.2))
    assert net.steps() == [(net[0], net[1])]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("device", DEVICES)
def test_elementwise_and_shape_layers_fast_equal_reference(device, dtype):
    makers = {"LeakyReLU": lambda L: L.LeakyReLU(0.1), "ReLU": lambda L: L.ReLU(), "Sigmoid": lambda L: L.Sigmoid(),
              "Tanh": lambda L: L.Tanh(), "Linear": lambda L: L.Linear(5, 3), "Flatten": lambda L: L.Flatten()}
    with on_device(device) as xp:
        for name, make in makers.items():
            for shape, layout in [((2, 3, 4, 5), "nhwc"), ((2, 3, 4, 5), "nchw"), ((1, 1, 1, 1), "nchw"), ((4, 5), "nhwc")]:
                if name == "Linear" and len(shape) != 2 or name == "Flatten" and layout == "nchw":
                    continue
                check_layer(make, shape, xp, dtype, f"{name} {shape} {layout}", layout)


# ---- the whole VAE ------------------------------------------------------------------------------------------

VAE_CASES = [
    {"image_size": 8, "preset": "tiny"},
    {"image_size": 16, "channels": (3, 5), "latent_dim": 3, "in_channels": 1},  # grayscale
    {"image_size": 8, "preset": "tiny", "recon": "bce", "mc_samples": 2, "beta": 2.0},
    {"image_size": 8, "preset": "tiny", "objective": "prior-mc", "mc_samples": 3},
    {"image_size": 8, "preset": "tiny", "recon": "gaussian", "recon_variance": "learned"},
]


def noisy_names(model):
    """A conv bias that feeds a BatchNorm gets a gradient of pure rounding noise (BatchNorm subtracts the mean),
    which Adam divides by its eps: such biases, and the running means after them, differ by up to about
    1e-8 between any two orders of summation. Their names."""
    names = set()
    for seq in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model, seq)):
            if isinstance(layer, layers.BatchNorm2d) and isinstance(getattr(model, seq)[i - 1], layers.Conv2d | layers.ConvTranspose2d):
                names |= {f"{seq}.{i - 1}.b", f"{seq}.{i}.running_mean"}
    return names


def train_both(kw, xp, dtype, steps=3, batch=3):
    """Each engine's VAE, with the same start, trained ``steps`` Adam steps on the same batches and noise:
    for each, the logs, the first step's gradients, and the state after the last step."""
    c, size, m = kw.get("in_channels", 3), kw["image_size"], kw.get("mc_samples", 1)
    latent = kw.get("latent_dim", 4)
    images = [numpy.random.default_rng(50 + i).random((batch, c, size, size)).astype(dtype) for i in range(steps)]
    noise = [host_random((m, batch, latent), 60 + i, dtype) for i in range(steps)]
    out = []
    for engine in ("reference", "fast"):
        with backend.default_dtype(dtype):
            model = VAE(seed=7, engine=engine, **kw)
        optimizer = model.make_optimizer(lr=1e-3)
        logs, first_grads = [], None
        for x, eps in zip(images, noise):
            logs.append(model.train_step(xp.asarray(x), optimizer, eps=xp.asarray(eps)))
            if first_grads is None:
                first_grads = {name: backend.to_host(g).copy() for name, _, g in model.named_parameters()}
        out.append((logs, first_grads, {k: backend.to_host(v) for k, v in model.state_dict().items()}, model))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", VAE_CASES, ids=["sse", "grayscale", "bce-m2", "prior-mc", "learned-variance"])
def test_vae_fast_equals_reference(device, dtype, kw):
    """The same loss and every gradient, every parameter and running statistic after three Adam steps (each
    engine's own Adam: the reference's per parameter, the fast one's over the flat array), and then, in eval
    mode and on the same weights (the reference's, loaded into the fast model), the same held-out figures,
    reconstructions and samples."""
    tol = TOL[dtype]
    with on_device(device) as xp:
        (ref_logs, ref_grads, ref_state, ref), (fast_logs, fast_grads, fast_state, model) = train_both(kw, xp, dtype)
        x = xp.asarray(numpy.random.default_rng(70).random((3, kw.get("in_channels", 3), kw["image_size"],
                                                                kw["image_size"])).astype(dtype))
        eps = xp.asarray(host_random((kw.get("mc_samples", 1), 3, kw.get("latent_dim", 4)), 71, dtype))
        model.load_state_dict(ref.state_dict())  # (the noisy biases and running means above differ by design)
        held_out = [m.evaluate(x, eps=eps) for m in (ref, model)]
        pictures = [[backend.to_host(m.reconstruct(x)), backend.to_host(m.sample(4, rng=backend.rng(72)))]
                    for m in (ref, model)]
    assert type(ref).__name__ == "VAE" and type(model).__name__ == "FastVAE"
    for step, (a, b) in enumerate(zip(fast_logs, ref_logs)):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), f"step {step + 1} {key}"
    noisy = noisy_names(ref)
    scale = max(float(numpy.abs(g).max()) for g in ref_grads.values())
    for name, want in ref_grads.items():
        got = fast_grads[name]
        if name in noisy:  # compared on the scale of all the gradients (its own is rounding noise)
            assert float(numpy.abs(got - want).max()) <= tol * scale, name
        else:
            assert_same(got, want, tol, f"gradient of {name}")
    assert fast_state.keys() == ref_state.keys()
    for name, want in ref_state.items():
        if name not in noisy:
            assert_same(fast_state[name], want, tol, f"{name} after three steps")
        elif dtype == numpy.float64:  # (in float32 Adam turns such noise into steps of up to lr: not compared)
            numpy.testing.assert_allclose(fast_state[name], want, atol=1e-7, err_msg=name)
    for key in held_out[0]:
        assert held_out[1][key] == pytest.approx(held_out[0][key], rel=tol, abs=tol), f"evaluate: {key}"
    for what, got, want in zip(("reconstruct", "sample"), pictures[1], pictures[0]):
        assert_same(got, want, tol, what)
