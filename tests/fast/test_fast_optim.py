"""The fast engine's Adam (``scratchvae.fast.optim``) against the formula, piece by piece and as the GPU path's
kernel on the stand-in device, and the flat arrays of parameters, gradients and buffers that ``FastVAE`` keeps."""
import contextlib

import numpy
import pytest

from scratchvae import backend
from scratchvae.fast import optim, workspace
from scratchvae.fast.optim import Adam
from scratchvae.vae import VAE


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_in_pieces_equals_the_formula_on_the_whole_array(xp, weight_decay):
    """Adam steps a large array piece by piece through its scratch arrays: the numbers of the formula applied
    to the whole array at once, operation for operation (so exactly equal), and the gradient is left as it was.
    (On a GPU the step is one fused kernel, which must round alike.)"""
    check_adam_against_the_formula(xp, weight_decay)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_kernel_on_the_stand_in_device_equals_the_formula(weight_decay):
    """The GPU path's fused Adam kernel (its CUDA C compiled for the CPU, on the tests' stand-in device) gives
    the formula's numbers exactly, in float64, and exactly NumPy's step in float32 (no fused multiply-adds)."""
    from strict_device import use_strict_device  # noqa: PLC0415

    with use_strict_device() as dev:
        check_adam_against_the_formula(dev, weight_decay)
    rng = numpy.random.default_rng(5)
    p0, grads = rng.standard_normal(1000).astype(numpy.float32), rng.standard_normal((3, 1000)).astype(numpy.float32)
    results = []
    for device in (contextlib.nullcontext(numpy), use_strict_device()):
        with device as xp:
            p, g = xp.asarray(p0.copy()), xp.zeros(1000, dtype=numpy.float32)
            opt = Adam([("p", p, g)], lr=0.01, weight_decay=weight_decay)
            for grad in grads:
                g[...] = xp.asarray(grad)
                opt.step()
            results.append([backend.to_host(a) for a in (p, opt.state[0]["m"], opt.state[0]["v"])])
    for name, a, b in zip("pmv", *results):
        assert a.dtype == numpy.float32, name
        numpy.testing.assert_array_equal(a, b, err_msg=name)


def check_adam_against_the_formula(xp, weight_decay):
    n = 3 * optim.PIECE + 5  # three whole pieces and a short one
    rng = numpy.random.default_rng(4)  # (host arrays, whichever the device)
    p0, grads = rng.standard_normal(n), [rng.standard_normal(n) for _ in range(3)]
    p, g = xp.asarray(p0.copy()), xp.zeros(n)
    opt = Adam([("p", p, g)], lr=0.01, weight_decay=weight_decay)
    want, m, v = p0.copy(), numpy.zeros(n), numpy.zeros(n)
    for t, grad in enumerate(grads, start=1):
        g[...] = xp.asarray(grad)
        opt.step()
        numpy.testing.assert_array_equal(backend.to_host(g), grad)
        grad = grad + weight_decay * want if weight_decay else grad
        m = 0.9 * m + (1 - 0.9) * grad
        v = 0.999 * v + (1 - 0.999) * (grad * grad)
        want -= (0.01 / (1 - 0.9 ** t)) * m / (numpy.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    numpy.testing.assert_array_equal(backend.to_host(p), want)


def tiny_vae(xp):
    return VAE(image_size=8, channels=(2, 3), latent_dim=2, seed=3)


def test_vae_parameters_are_views_of_one_array(xp):
    model = tiny_vae(xp)
    flat = workspace.flat_parameters(model)
    assert flat is not None
    flat_p, flat_g = flat
    assert flat_p.size == flat_g.size == model.num_parameters()
    assert workspace.flat_parameters(workspace.flatten_parameters(model))[0] is flat_p  # a second call keeps the arrays
    model.fc_mu.params["W"][0, 0] = 7.0  # writes through to the one array, and back
    flat_p[flat_p.size - 1] = -3.0
    offset = 0
    for _, p, g in model.named_parameters():
        numpy.testing.assert_array_equal(backend.to_host(flat_p[offset:offset + p.size]), backend.to_host(p).ravel())
        offset += p.size
    assert backend.to_host(model.decoder.layers[-2].params["b"])[-1] == -3.0
    model.fc_mu.grads["W"][...] = 1.0
    model.zero_grad()
    assert not backend.to_host(flat_g).any()


def unflattened(model):
    """``model`` with every parameter, gradient and buffer in an array of its own, as before ``flatten_parameters``."""
    for _, module in model.named_modules():
        for arrays in (module.params, module.grads, module.buffers):
            for name in arrays:
                arrays[name] = arrays[name].copy()
    return model


def test_a_model_whose_arrays_are_its_own_falls_back_to_one_array_per_parameter(xp):
    model = unflattened(tiny_vae(xp))
    assert workspace.flat_parameters(model) is None and workspace.flat_buffers(model) is None
    for _, _, g in model.named_parameters():
        g[...] = 1.0
    model.zero_grad()  # must zero the gradients the layers use, not a stale flat array
    assert not any(backend.to_host(g).any() for _, _, g in model.named_parameters())
    assert len(Adam(model).groups) == len(list(model.named_parameters()))


def test_a_deep_copy_is_flat_again_with_arrays_of_its_own(xp):
    import copy  # noqa: PLC0415

    model = tiny_vae(xp)
    clone = copy.deepcopy(model)
    flat, clone_flat = workspace.flat_parameters(model), workspace.flat_parameters(clone)
    assert clone_flat is not None and workspace.flat_buffers(clone) is not None
    assert clone_flat[0] is not flat[0]
    numpy.testing.assert_array_equal(backend.to_host(clone_flat[0]), backend.to_host(flat[0]))
    clone_flat[0][...] = 0  # the copy's parameters are its own
    assert backend.to_host(flat[0]).any()
    assert len(Adam(clone).groups) == 1


@pytest.mark.parametrize("flat", [True, False])
def test_snapshot_and_restore_of_the_buffers(xp, flat):
    """BatchNorm's running statistics are views of one array too (one copy saves them all, as ``train_step`` does
    before a step it may have to undo); without it, a copy per buffer. Either way ``restore_buffers``
    puts back every value and keeps the arrays the layers hold."""
    import copy  # noqa: PLC0415

    model = tiny_vae(xp) if flat else unflattened(tiny_vae(xp))
    buffers = dict(model.named_buffers())
    assert len(buffers) == 8  # four BatchNorm2d layers (two in the encoder, two in the decoder), two buffers each
    for i, b in enumerate(buffers.values()):
        b[...] = xp.asarray(numpy.arange(b.size, dtype=b.dtype) + 10 * i)
    want = {name: backend.to_host(b).copy() for name, b in buffers.items()}
    snapshot = model.snapshot_buffers()
    if flat:
        assert snapshot.shape == (sum(b.size for b in buffers.values()),)  # one array
    else:
        assert isinstance(snapshot, dict) and set(snapshot) == set(buffers)
    for b in buffers.values():
        b[...] = -1
    model.restore_buffers(snapshot)
    for name, b in model.named_buffers():
        assert b is buffers[name]
        numpy.testing.assert_array_equal(backend.to_host(b), want[name], err_msg=name)


def test_adam_on_the_flat_array_equals_adam_per_parameter(xp):
    """One group over the flat array and one group per parameter: the same numbers, the same state dict."""
    import copy  # noqa: PLC0415

    flat_model = tiny_vae(xp)
    split_model = unflattened(copy.deepcopy(flat_model))
    flat_opt, split_opt = Adam(flat_model, lr=0.01), Adam(split_model, lr=0.01)
    assert len(flat_opt.groups) == 1 and len(split_opt.groups) > 1
    rng = backend.rng(9)
    x = xp.asarray(rng.random((4, 3, 8, 8)).astype(numpy.float32))
    for step in range(3):
        eps = xp.asarray(rng.standard_normal((1, 4, 2)).astype(numpy.float32))
        flat_model.train_step(x, flat_opt, eps=eps)
        split_model.train_step(x, split_opt, eps=eps)
    for (name, a, _), (_, b, _) in zip(flat_model.named_parameters(), split_model.named_parameters()):
        numpy.testing.assert_array_equal(backend.to_host(a), backend.to_host(b), err_msg=name)
    flat_state, split_state = flat_opt.state_dict(), split_opt.state_dict()
    assert set(flat_state) == set(split_state) and f"{name}/m" in flat_state
    for key, value in split_state.items():
        numpy.testing.assert_array_equal(backend.to_host(flat_state[key]) if hasattr(value, "shape") else flat_state[key],
                                         backend.to_host(value) if hasattr(value, "shape") else value, err_msg=key)
    # the per-parameter state loads into the flat optimiser of a fresh model, and training continues identically
    resumed = tiny_vae(xp)
    resumed.load_state_dict(split_model.state_dict())
    resumed_opt = Adam(resumed, lr=0.01)
    resumed_opt.load_state_dict({k: backend.to_host(v) if hasattr(v, "shape") else v for k, v in split_state.items()})
    eps = xp.asarray(rng.standard_normal((1, 4, 2)).astype(numpy.float32))
    resumed.train_step(x, resumed_opt, eps=eps)
    split_model.train_step(x, split_opt, eps=eps)
    for (name, a, _), (_, b, _) in zip(resumed.named_parameters(), split_model.named_parameters()):
        numpy.testing.assert_array_equal(backend.to_host(a), backend.to_host(b), err_msg=name)
