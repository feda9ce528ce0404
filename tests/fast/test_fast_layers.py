"""The fast engine's own machinery (``scratchvae.fast``): gathers, the multiply-first convolution, work arrays and
recycled outputs, channel rows and pieces, BatchNorm joined to its activation, and the GPU path's kernels on
the tests' stand-in device, each against the NumPy path or a definition."""
import contextlib
import itertools

import numpy
import pytest
from naive import naive_conv2d, naive_conv_transpose2d, randn

from scratchvae import backend, fast, layers
from scratchvae.fast import activations, conv, norm, workspace
from scratchvae.gradcheck import check_module

TOL = 1e-6  # maximum element-wise relative error accepted (see scratchvae.gradcheck)
MEASURED = {}  # case -> max relative error, printed at the end


def set_piece(monkeypatch, numbers):
    """Pieces of ``numbers`` numbers for BatchNorm and the activations (many pieces: the loops really run)."""
    monkeypatch.setattr(norm, "PIECE", numbers)
    monkeypatch.setattr(activations, "PIECE", numbers)


def run_check(name, module, x, seed=1):
    report = check_module(module, x, backend.rng(seed), tol=TOL)
    MEASURED[name] = max(MEASURED.get(name, 0.0), max(report.values()))
    return report


@pytest.mark.parametrize("stand_in", [False, True])
def test_gather_reads_zeros_outside_the_image_like_a_padded_copy(xp, f64, stand_in):
    """``gather`` with windows reaching past any side (even wholly outside) equals plain windows of a zero-padded copy
    (also on the tests' stand-in device, where one ``im2col`` kernel writes the whole matrix), with and without a
    column of ones."""
    if stand_in:
        from strict_device import use_strict_device  # noqa: PLC0415

        with use_strict_device() as dev:
            return check_gather(dev)
    check_gather(xp)


def test_gather_on_a_device_refuses_more_rows_than_its_kernel_counts():
    from strict_device import use_strict_device  # noqa: PLC0415

    with use_strict_device() as dev:
        x = dev.zeros((2, 4, 4, 3))
        with pytest.raises(ValueError, match="smaller batch"):
            conv.gather(workspace.Workspace(), "col", x, 0, 0, 2 ** 15, 2 ** 15, 3, 3, 1)  # 2^31 rows, before any memory


def check_gather(xp):
    cases = [  # (h, w), top, left, (oh, ow), k, stride
        ((6, 7), -1, -1, (3, 4), 3, 2), ((6, 7), -1, -1, (6, 7), 3, 1), ((5, 5), -2, -3, (5, 4), 3, 2),
        ((4, 6), 0, -1, (3, 6), 2, 1), ((3, 3), -4, -4, (6, 5), 3, 2), ((7, 4), 1, -2, (2, 3), 3, 3),
        ((2, 2), -1, -1, (4, 4), 3, 1), ((6, 7), 0, 0, (4, 5), 3, 1),
    ]
    for index, ((h, w), top, left, (oh, ow), k, s) in enumerate(cases):
        planes = randn(xp, 2, 3, h, w, seed=30 + index)
        for x, one in itertools.product((planes.transpose(0, 2, 3, 1), xp.ascontiguousarray(planes.transpose(0, 2, 3, 1))),
                                        (1, 0)):
            module = workspace.Workspace()
            got = backend.to_host(conv.gather(module, "col", x, top, left, oh, ow, k, k, s, ones_column=bool(one)))
            pad = 10  # more than any window reaches outside
            big = numpy.zeros((2, h + 2 * pad, w + 2 * pad, 3))
            big[:, pad:pad + h, pad:pad + w] = backend.to_host(x)
            want = numpy.lib.stride_tricks.as_strided(big[:, pad + top:, pad + left:], (2, oh, ow, k, k * 3),
                                                      (big.strides[0], s * big.strides[1], s * big.strides[2],
                                                       big.strides[1], big.strides[3]))
            assert got.shape == (2 * oh * ow, one + k * k * 3)
            numpy.testing.assert_array_equal(got[:, :one], 1)
            numpy.testing.assert_array_equal(got[:, one:], want.reshape(2 * oh * ow, -1))
            got2 = backend.to_host(conv.gather(module, "col", 2 * x, top, left, oh, ow, k, k, s, ones_column=bool(one)))
            numpy.testing.assert_array_equal(got2[:, one:], 2 * want.reshape(2 * oh * ow, -1))  # work arrays reused


@pytest.mark.parametrize("device", ["cpu", "stand-in", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_transposed_conv_matches_naive_loop_for_every_kernel_geometry(monkeypatch, device):
    """The sub-pixel weight matrix, built phase by phase from strided slices of W (on a device: by the
    ``subpixel_weights`` kernel, on a GPU or the tests' stand-in device), is right for kernels of 1 to 5 taps
    (square and not), strides 1 to 3, every padding below the kernel size, with a bias and without."""
    from strict_device import use_strict_device  # noqa: PLC0415

    if device == "gpu" and not backend.gpu_available():
        pytest.skip("no usable GPU/CuPy")
    monkeypatch.setitem(backend._state, "xp", numpy)
    devices = {"cpu": lambda: contextlib.nullcontext(numpy), "stand-in": use_strict_device,
               "gpu": lambda: contextlib.nullcontext(backend.set_device("gpu"))}
    with devices[device]() as xp:
        for kh, kw, s in itertools.product(range(1, 6), (1, 3, 4), (1, 2, 3)):
            for p, op in itertools.product(range(min(kh, kw)), range(s)):
                if (3 - 1) * s - 2 * p + kh + op <= 0 or (4 - 1) * s - 2 * p + kw + op <= 0:
                    continue
                bias = (kh + op) % 2 == 0
                layer = fast.ConvTranspose2d(2, 3, (kh, kw), stride=s, padding=p, output_padding=op, bias=bias,
                                               rng=backend.rng(kh + 10 * kw + 100 * s), dtype=numpy.float64)
                x = backend.to_host(randn(numpy, 2, 3, 4, 2, seed=p + 7 * op))
                w = backend.to_host(layer.params["W"])
                b = backend.to_host(layer.params["b"]) if bias else 0
                want = naive_conv_transpose2d(x, w, b, s, p, op)
                numpy.testing.assert_allclose(backend.to_host(layer.forward(xp.asarray(x))), want, rtol=1e-12, atol=1e-12,
                                              err_msg=f"kernel {kh}x{kw}, stride {s}, padding {p}, output padding {op}")


MULTIPLY_FIRST_CASES = [(b, k, p) for b, k, p in itertools.product([1, 3], [3, (2, 3)], [0, 1, 2])]


@pytest.mark.parametrize("batch,k,p", MULTIPLY_FIRST_CASES)
def test_conv2d_multiply_first_gradients(xp, f64, batch, k, p):
    """Stride 1 with fewer outputs than inputs (like the decoder's last 32 -> 3 layer) multiplies, then shifts."""
    layer = fast.Conv2d(4, 3, k, stride=1, padding=p, rng=backend.rng(13))
    assert layer.multiply_first
    report = run_check("Conv2d (multiply first)", layer, randn(xp, batch, 5, 6, 4))
    assert set(report) == {"x", "W", "b"}


@pytest.mark.parametrize("images_per_block", [1, 2, 6])
def test_conv2d_multiply_first_in_blocks_of_images(xp, f64, monkeypatch, images_per_block):
    """The multiply-first conv works through blocks of images (``TAP_BLOCK``): the same output and gradients
    as in one block, and correct by finite differences, whatever the block."""
    x, dy = randn(xp, 6, 5, 6, 4, seed=34), randn(xp, 6, 5, 6, 3, seed=35)

    def run():
        layer = fast.Conv2d(4, 3, 3, stride=1, padding=1, rng=backend.rng(13))
        y = layer.forward(x)
        dx = layer.backward(dy)
        return layer, [backend.to_host(a).copy() for a in (y, dx, *layer.grads.values())]

    _, want = run()  # one block: TAP_BLOCK holds all six images
    monkeypatch.setattr(conv, "TAP_BLOCK", images_per_block * 27 * 30)
    layer, got = run()
    assert layer._block(x) == (6 if backend.is_device_array(x) else images_per_block)  # a GPU takes all at once
    for a, b in zip(got, want):
        numpy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    report = run_check(f"Conv2d (multiply first, blocks of {images_per_block})", fast.Conv2d(4, 3, 3, padding=1, rng=backend.rng(13)), x)
    assert report["x"] <= TOL


@pytest.mark.parametrize("blocks", [1, 2, 3, 7])
@pytest.mark.parametrize("kind", ["transposed", "conv"])
def test_convolutions_in_blocks_of_images(f64, monkeypatch, blocks, kind):
    """The sub-pixel products and ConvTranspose2d's backward work through blocks of images (``SUBPIXEL_BLOCK``,
    ``DCOL_BLOCK``), the last one shorter where the blocks do not divide the batch: the reference layer's
    numbers, and correct by finite differences."""
    x = randn(numpy, 7, 5, 6, 4, seed=36)
    options = {"stride": 2, "padding": 1}

    def make(engine):
        rng = backend.rng(15)  # the same weights in both engines
        return engine.ConvTranspose2d(4, 3, 3, output_padding=1, rng=rng, **options) if kind == "transposed" \
            else engine.Conv2d(4, 3, 3, rng=rng, **options)

    def run(engine):
        layer = make(engine)
        y = layer.forward(x)
        dx = layer.backward(randn(numpy, *y.shape, seed=37))
        return [a.copy() for a in (y, dx, *layer.grads.values())]

    want = run(layers)
    assert conv.images_per_block(7, 10, 10 * 7) == 7
    monkeypatch.setattr(conv, "images_per_block", lambda n, per_image, size: -(-n // blocks))  # 7, 4 + 3, 3 + 3 + 1...
    got = run(fast)
    for a, b in zip(got, want):
        numpy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    report = run_check(f"{kind} conv in {blocks} blocks of images", make(fast), x)
    assert report["x"] <= TOL


@pytest.mark.parametrize("n, per_image, size, block", [
    (64, 294912, 1 << 21, 8), (61, 294912, 1 << 21, 7), (64, 66560, 1 << 21, 22), (5, 10 ** 7, 1 << 21, 1),
    (1, 100, 1 << 21, 1), (7, 10, 70, 7)])
def test_images_per_block(n, per_image, size, block):
    assert conv.images_per_block(n, per_image, size) == block
    blocks = -(-n // block)
    assert block * per_image <= max(size, per_image) + per_image  # about size: within one image of it
    assert blocks == 1 or n * per_image > (blocks - 1) * size  # and no fewer blocks would do
    last = n - (blocks - 1) * block
    assert 0 < last <= block and block - last < blocks  # the last block is short by fewer images than there are blocks


@pytest.mark.parametrize("p", [0, 1, 2])
def test_conv2d_multiply_first_forward_matches_naive_loop(xp, f64, p):
    layer = fast.Conv2d(5, 2, 3, stride=1, padding=p, rng=backend.rng(14))
    x = randn(xp, 2, 6, 7, 5)
    y = layer.forward(x)
    want = naive_conv2d(backend.to_host(x), backend.to_host(layer.params["W"]),
                        backend.to_host(layer.params["b"]), 1, p)
    numpy.testing.assert_allclose(backend.to_host(y), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make,shape", [
    (lambda: fast.Conv2d(4, 3, 3, padding=1), (2, 5, 6, 4)),  # multiply first, like the decoder's last layer
    (lambda: fast.Conv2d(4, 3, (2, 3), padding=0, bias=False), (3, 5, 6, 4)),
    (lambda: fast.Conv2d(4, 2, (5, 3), padding=2), (2, 4, 7, 4)),
    (lambda: fast.Conv2d(4, 1, 1), (2, 3, 3, 4)),
    (lambda: fast.Conv2d(3, 5, 3, stride=2, padding=1), (2, 7, 6, 3)),  # gather, then one product
    (lambda: fast.Conv2d(2, 4, (3, 2), stride=3, padding=1), (2, 8, 7, 2)),
    (lambda: fast.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (2, 3, 4, 3)),
    (lambda: fast.ConvTranspose2d(2, 3, (4, 3), stride=2, padding=1, bias=False), (3, 2, 3, 2)),
])
@pytest.mark.parametrize("device", ["stand-in", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_convolution_kernels_give_the_numpy_numbers(monkeypatch, make, shape, device):
    """On a device the convolutions run ``scratchvae.fast.kernels``' im2col, subpixel_weights, tap_planes_sum,
    tap_planes_of_dy and add_block_sums (on a GPU, and on the tests' stand-in device, which compiles their CUDA C
    for the CPU): output, dx and the parameter gradients (two backward calls) equal the NumPy path's to 1e-12 in
    float64, for the images' NCHW layout seen as NHWC and for contiguous input."""
    from strict_device import use_strict_device  # noqa: PLC0415

    if device == "gpu" and not backend.gpu_available():
        pytest.skip("no usable GPU/CuPy")
    rng = numpy.random.default_rng(17)
    planes = rng.standard_normal((shape[0], shape[3], shape[1], shape[2]))
    x = planes.transpose(0, 2, 3, 1)

    def run(xp, x):
        with backend.default_dtype(numpy.float64):
            layer = make()
        for name, value in params.items():
            layer.params[name][...] = xp.asarray(value)
        y = layer.forward(xp.asarray(x) if x.flags.c_contiguous else xp.asarray(planes).transpose(0, 2, 3, 1))
        dy = numpy.random.default_rng(18).standard_normal(y.shape)
        results = [backend.to_host(y).copy()]
        for g in (dy, 2 * dy):
            results.append(backend.to_host(layer.backward(xp.asarray(g))).copy())
        return results + [backend.to_host(g) for g in layer.grads.values()]

    monkeypatch.setitem(backend._state, "xp", numpy)
    with backend.default_dtype(numpy.float64):
        params = {name: rng.standard_normal(p.shape) for name, p in make().params.items()}
    for x_in in (x, numpy.ascontiguousarray(x)):
        want = run(numpy, x_in)
        with contextlib.nullcontext(backend.set_device("gpu")) if device == "gpu" else use_strict_device() as dev:
            got = run(dev, x_in)
        backend._state["xp"] = numpy
        for name, a, b in zip(["y", "dx", "dx (second call)", *params], got, want):
            numpy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("make,shape", [
    (lambda: fast.Conv2d(3, 4, 3, stride=2, padding=1, rng=backend.rng(18)), (3, 8, 6, 3)),
    (lambda: fast.Conv2d(4, 2, 3, stride=1, padding=1, rng=backend.rng(18)), (3, 5, 6, 4)),
    (lambda: fast.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1, rng=backend.rng(18)), (3, 3, 4, 3)),
    (lambda: fast.BatchNorm2d(3), (3, 4, 5, 3)),
])
def test_work_arrays_reused_across_steps_give_identical_results(xp, f64, make, shape):
    """Work arrays are kept between calls: a second step, and a step after another batch size, must match a fresh layer."""
    x, other = randn(xp, *shape, seed=19), randn(xp, shape[0] + 2, *shape[1:], seed=20)

    def step(layer, inp):
        y = layer.forward(inp)
        layer.zero_grad()
        dx = layer.backward(randn(xp, *y.shape, seed=21))
        return [backend.to_host(a).copy() for a in (y, dx, *layer.grads.values())]

    want = step(make(), x)
    layer = make()
    for inp in (x, x, other, x):  # the same batch twice, a larger one (new work arrays), the first again
        got = step(layer, inp)
    for a, b in zip(got, want):
        numpy.testing.assert_array_equal(a, b)


def test_elementwise_layers_keep_a_channel_planar_layout(xp):
    """Sigmoid on image planes (what the multiply-first conv returns) computes in that order, and returns it."""
    planes = backend.rng(24).standard_normal((2, 3, 5, 4)).astype(numpy.float32)
    x = planes.transpose(0, 2, 3, 1)  # NHWC, held as NCHW
    layer = fast.Sigmoid()
    for recycle in (False, True):
        layer.recycle_outputs = recycle
        y = layer.forward(x)
        numpy.testing.assert_allclose(backend.to_host(y), 1 / (1 + numpy.exp(-backend.to_host(x))), rtol=1e-6)
        dx = layer.backward(x)
        numpy.testing.assert_allclose(backend.to_host(dx), backend.to_host(x * y * (1 - y)), rtol=1e-6)
        if not backend.is_device_array(x):
            assert y.transpose(0, 3, 1, 2).flags.c_contiguous and dx.transpose(0, 3, 1, 2).flags.c_contiguous


def test_recycled_outputs_match_new_ones_and_end_with_the_block(xp, f64):
    """Inside ``recycling_outputs`` (a training step) layers overwrite their previous outputs; results are the same."""
    def make():
        rng = backend.rng(25)
        return fast.Sequential(
            fast.Conv2d(2, 4, 3, stride=2, padding=1, rng=rng), fast.BatchNorm2d(4), fast.LeakyReLU(),
            fast.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, rng=rng), fast.BatchNorm2d(3),
            fast.LeakyReLU(), fast.Conv2d(3, 2, 3, padding=1, rng=rng), fast.Sigmoid())
    new, recycled = make(), make()
    for seed in (26, 27, 26):
        x = randn(xp, 3, 6, 8, 2, seed=seed)
        results = []
        for net in (new, recycled):
            net.zero_grad()
            with (workspace.recycling_outputs(net) if net is recycled else contextlib.nullcontext()):
                y = net.forward(x)
                dx = net.backward(randn(xp, *y.shape, seed=seed + 10))
                results.append([backend.to_host(a).copy() for a in (y, dx, *(g for _, _, g in net.named_parameters()))])
        for a, b in zip(*results):
            numpy.testing.assert_array_equal(a, b)
    assert not any(getattr(m, "recycle_outputs", False) for _, m in recycled.named_modules())
    first = recycled.forward(randn(xp, 3, 6, 8, 2, seed=28))
    kept = backend.to_host(first).copy()
    recycled.forward(randn(xp, 3, 6, 8, 2, seed=29))
    numpy.testing.assert_array_equal(backend.to_host(first), kept)  # outside the block: new arrays every call


@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (4, 8, 8, 16), (3, 5), (2, 3, 3, 2048)])
def test_channel_rows_and_pixel_sums(xp, shape):
    """Rows of k whole pixels keep every channel in its column class; pixel sums equal plain float64 sums."""
    x = xp.asarray(backend.rng(22).standard_normal(shape).astype(numpy.float32))
    y = xp.asarray(backend.rng(23).standard_normal(shape).astype(numpy.float32))
    rows, k = norm.channel_rows(x)
    c = shape[-1]
    assert rows.shape == (x.size // c // k, k * c) and (k * c >= norm.ROW or (x.size // c) % (2 * k))
    v = xp.asarray(numpy.arange(c, dtype=numpy.float32))
    numpy.testing.assert_array_equal(backend.to_host((rows * norm.tiled(v, k)).reshape(shape)),
                                     backend.to_host(x * v))  # a tiled vector meets each pixel's own channels
    plain_x, plain_y = (backend.to_host(a).astype(numpy.float64).reshape(-1, c) for a in (x, y))
    numpy.testing.assert_allclose(backend.to_host(norm.pixel_sums(rows, k)), plain_x.sum(axis=0),
                                  rtol=1e-5, atol=1e-5)
    y_rows, _ = norm.channel_rows(y)
    numpy.testing.assert_allclose(backend.to_host(norm.pixel_sums(rows, k, y_rows)), (plain_x * plain_y).sum(axis=0),
                                  rtol=1e-5, atol=1e-5)
    strided = x[..., ::-1]  # not contiguous: copied, same values
    rows_s, k_s = norm.channel_rows(strided)
    numpy.testing.assert_array_equal(backend.to_host(rows_s.reshape(shape)), backend.to_host(strided))


@pytest.mark.parametrize("shape,size", [((10, 3), 7), ((10, 3), 30), ((5, 2, 4), 9), ((1000,), 64), ((6, 4), 1)])
def test_pieces_cover_every_row_once_in_order(shape, size):
    a, b = numpy.arange(numpy.prod(shape)).reshape(shape), -numpy.arange(numpy.prod(shape)).reshape(shape)
    got = list(workspace.pieces(a, b, size=size))
    assert all(pa.shape == pb.shape and numpy.shares_memory(pa, a) for pa, pb in got)
    numpy.testing.assert_array_equal(numpy.concatenate([pa for pa, _ in got]), a)
    numpy.testing.assert_array_equal(numpy.concatenate([pb for _, pb in got]), b)
    per_row = a.size // len(a)
    if a.size <= size:
        assert len(got) == 1
    else:  # whole rows, as many as fit in `size` numbers (at least one)
        assert all(len(pa) == max(1, size // per_row) for pa, _ in got[:-1])


def test_device_arrays_come_as_one_piece():
    from strict_device import use_strict_device  # noqa: PLC0415

    with use_strict_device() as dev:
        a = dev.zeros((100, 10))
        (piece,) = list(workspace.pieces(a, a, size=8))
        assert piece[0] is a


@pytest.mark.parametrize("make,shape", [
    (lambda: fast.BatchNorm2d(3), (4, 5, 6, 3)),
    (lambda: fast.BatchNorm2d(3).eval(), (4, 5, 6, 3)),
    (lambda: fast.LeakyReLU(0.1), (4, 5, 6, 3)),
])
def test_elementwise_layers_give_the_same_numbers_piece_by_piece(xp, f64, monkeypatch, make, shape):
    """With pieces of one row (or one image) each, BatchNorm and LeakyReLU compute what they compute at once."""
    x, dy = randn(xp, *shape, seed=30), randn(xp, *shape, seed=31)
    results = []
    for piece in (1, 10**9):
        set_piece(monkeypatch, piece)
        layer = make()
        if isinstance(layer, fast.BatchNorm2d):
            layer.buffers["running_var"][...] = 2.0
        y, dx = layer.forward(x), layer.backward(dy)
        results.append([backend.to_host(a).copy() for a in (y, dx, *layer.grads.values(), *layer.buffers.values())])
    for a, b in zip(*results):
        numpy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    set_piece(monkeypatch, 1)
    layer = make()
    report = run_check(f"{type(layer).__name__} (piece by piece)", layer, x)
    assert report["x"] <= TOL


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make_activation", [lambda: fast.LeakyReLU(0.1), fast.ReLU])
def test_batchnorm_applying_the_next_activation_equals_the_two_layers(xp, f64, monkeypatch, training, make_activation):
    """Sequential runs BatchNorm2d + LeakyReLU as one step (the activation applied inside BatchNorm's passes):
    the same output, input gradient, parameter gradients and running statistics as the layers one by one."""
    x, dy = 2 * randn(xp, 4, 5, 6, 3, seed=32) + 0.3, randn(xp, 4, 5, 6, 3, seed=33)

    def make():
        bn = fast.BatchNorm2d(3)
        bn.params["gamma"][...] = xp.asarray([1.5, -0.7, 0.9])
        bn.params["beta"][...] = xp.asarray([0.2, 0.0, -0.4])
        bn.buffers["running_var"][...] = 2.0
        return bn.train(training), make_activation()

    bn, act = make()
    y = act.forward(bn.forward(x))
    dx = bn.backward(act.backward(dy))
    want = [backend.to_host(a).copy() for a in (y, dx, *bn.grads.values(), *bn.buffers.values())]
    for piece in (1, 10**9):
        set_piece(monkeypatch, piece)
        net = fast.Sequential(*make())
        assert net.steps() == [(net[0], net[1])]  # joined: the activation runs inside BatchNorm
        y, dx = net.forward(x), net.backward(dy)
        got = [backend.to_host(a).copy() for a in (y, dx, *net[0].grads.values(), *net[0].buffers.values())]
        for a, b in zip(got, want):
            numpy.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    set_piece(monkeypatch, 1)
    net = fast.Sequential(*make())
    report = run_check(f"BatchNorm2d + {type(net[1]).__name__} ({'train' if training else 'eval'})", net, x)
    assert report["x"] <= TOL


@pytest.mark.parametrize("device", ["stand-in", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype,rtol", [(numpy.float64, 1e-12), (numpy.float32, 2e-5)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("make_activation", [lambda: None, lambda: fast.LeakyReLU(0.2), fast.ReLU])
def test_batchnorm_gpu_kernels_give_the_numpy_numbers(monkeypatch, device, dtype, rtol, training, make_activation):
    """On a device BatchNorm2d runs its fused kernels (``scratchvae.fast.kernels``): on a GPU, and on the tests' stand-in
    device, which compiles their CUDA C for the CPU. Output, input gradient, accumulated parameter gradients (two
    backward calls) and running statistics equal the NumPy path's, in train and eval mode, alone or with a
    LeakyReLU or ReLU joined to it."""
    from strict_device import use_strict_device  # noqa: PLC0415

    if device == "gpu" and not backend.gpu_available():
        pytest.skip("no usable GPU/CuPy")

    rng = numpy.random.default_rng(34)
    x, dy, dy2 = (rng.standard_normal((4, 5, 6, 3)).astype(dtype) for _ in range(3))
    x = 2 * x + dtype(0.3)  # a mean away from zero

    def run(to_device):
        with backend.default_dtype(dtype):
            bn, act = fast.BatchNorm2d(3), make_activation()
        bn.params["gamma"][...] = to_device(numpy.array([1.5, -0.7, 0.9], dtype=dtype))
        bn.params["beta"][...] = to_device(numpy.array([0.2, 0.0, -0.4], dtype=dtype))
        bn.buffers["running_mean"][...] = to_device(numpy.array([0.1, -0.2, 0.3], dtype=dtype))
        bn.buffers["running_var"][...] = to_device(numpy.array([2.0, 0.5, 1.0], dtype=dtype))
        bn.train(training)
        y = bn.forward(to_device(x), activation=act)
        results = [backend.to_host(y).copy()]
        for g in (dy, dy2):  # the second call adds to the parameters' gradients
            results.append(backend.to_host(bn.backward(to_device(g))).copy())
        return results + [backend.to_host(a) for a in (*bn.grads.values(), *bn.buffers.values())]

    monkeypatch.setitem(backend._state, "xp", numpy)  # the CPU first; the device the test found comes back after it
    want = run(numpy.asarray)
    if device == "gpu":
        got = run(backend.set_device("gpu").asarray)
    else:
        with use_strict_device() as dev:
            got = run(dev.asarray)
    names = ["y", "dx", "dx (second call)", "dgamma", "dbeta", "running_mean", "running_var"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype, name
        numpy.testing.assert_allclose(a, b, rtol=rtol, atol=rtol, err_msg=name)


def test_sequential_joins_only_a_batchnorm_directly_followed_by_a_leaky_relu():
    bn, bn2, act, act2, sig = fast.BatchNorm2d(2), fast.BatchNorm2d(2), fast.LeakyReLU(), fast.ReLU(), fast.Sigmoid()
    assert fast.Sequential(bn, act, act2, bn2, sig).steps() == [(bn, act), (act2, None), (bn2, None), (sig, None)]
    assert fast.Sequential(act, bn).steps() == [(act, None), (bn, None)]


def test_batchnorm_statistics_on_both_paths_are_those_of_the_float32_numbers():
    """The NumPy path (variance from x - mean, a second pass) and the GPU path on the stand-in device, which compiles
    the same C (variance as E[x^2] - mean^2, summed in float64, one pass): for a float32 batch whose mean lies 2000
    standard deviations from zero, both give the mean and variance of its float32 numbers to float32 rounding."""
    from strict_device import use_strict_device  # noqa: PLC0415

    x = (1000.0 + 0.5 * numpy.random.default_rng(24).standard_normal((64, 32, 32, 4))).astype(numpy.float32)
    exact = x.astype(numpy.float64).reshape(-1, 4)
    for device in (contextlib.nullcontext(numpy), use_strict_device()):
        with device as dev:
            bn = fast.BatchNorm2d(4, momentum=1.0)  # the running estimates become the batch's own
            bn.forward(dev.asarray(x))
            got = [backend.to_host(bn.buffers[name]) for name in ("running_mean", "running_var")]
        numpy.testing.assert_allclose(got[0], exact.mean(axis=0), rtol=1e-6)
        numpy.testing.assert_allclose(got[1], exact.var(axis=0, ddof=1), rtol=1e-6)


def test_report_measured_errors(capsys):
    """Prints the largest relative error each fast-only case reached (collected by the checks above)."""
    with capsys.disabled():
        for name, err in sorted(MEASURED.items()):
            print(f"\n  gradcheck max relative error  {name:40s} {err:.2e}", end="")
        print()
    assert all(err <= TOL for err in MEASURED.values())
