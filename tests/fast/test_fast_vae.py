"""The fast engine's VAE (``FastVAE``, what ``VAE(engine="fast")`` builds): its GPU path, run on the tests' stand-in
device, against its CPU path."""
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
