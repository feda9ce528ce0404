"""Finite-difference gradient checks: compare a hand-written backward against central differences.

For a scalar loss L and a tensor t, the numeric gradient of element k is

    dL/dt_k ~ (L(t + h e_k) - L(t - h e_k)) / (2 h)          (error O(h^2))

To check a layer or any function y = f(x) with a backward, we make it scalar with a random upstream
gradient dy:  L = sum(dy * f(x)),  so dL/dx is exactly what ``backward(dy)`` must return. The numeric
side is computed as sum(dy * (f(x + h e_k) - f(x - h e_k))) / 2h, differencing each output first.

The element-wise relative error is |a - n| / max(|a|, |n|, floor), with
floor = max(1e-3 * max|n|, roundoff / tol): the numeric difference carries a float64 round-off of up to
roundoff = 4 * 2.2e-16 * S / h, where S is |L| (or sum|dy * y|) and 4 allows for the few roundings a long
sum accumulates (measured on a model's loss: one to two ulps), so a gradient smaller than roundoff / tol
cannot be resolved to tol and is judged absolutely instead (a bias feeding BatchNorm, whose true gradient
is zero, is the usual case); an element a thousand times smaller than its tensor's largest gradient is
judged on that scale. Checks run in float64 only;
in float32 round-off swamps the differences.

For whole models, ``directional_check`` perturbs every tensor at once along one random direction d:
two forward passes give (L(theta + h d) - L(theta - h d)) / 2h, which must equal <grad, d>.
"""
from __future__ import annotations

import numpy

from .backend import array_module, to_host

DEFAULT_EPS = 1e-5
DEFAULT_TOL = 1e-6


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with the numeric one; the message names the tensor and element."""


def _require_float64(name, t):
    if t.dtype != numpy.float64:
        raise TypeError(f"gradient checks need float64, but {name!r} is {t.dtype}: build the layer or "
                        "model inside `with backend.default_dtype(numpy.float64):` and pass float64 inputs")


def numerical_gradient(fn, t, eps=DEFAULT_EPS, dy=None):
    """Central-difference gradient with respect to array ``t`` (perturbed in place, then restored).

    ``fn()`` returns a scalar loss, or, with ``dy`` given, an output array y for the loss sum(dy * y).
    In the second form the two outputs are subtracted element by element before the weighted sum, so
    the round-off is that of each y_j, not of the whole sum: several digits more accurate.
    """
    xp = array_module(t)
    grad = xp.zeros(t.shape, dtype=numpy.float64)
    if not t.flags.c_contiguous:  # reshape(-1) would copy, and the perturbation would miss t
        raise ValueError("numerical_gradient needs a C-contiguous array to perturb in place")
    flat, gflat = t.reshape(-1), grad.reshape(-1)
    for k in range(t.size):
        old = flat[k].copy()
        flat[k] = old + eps
        plus = xp.array(fn(), copy=True)  # a copy: fn may return a view of t (Flatten, Reshape)
        flat[k] = old - eps
        minus = xp.array(fn(), copy=True)
        flat[k] = old
        diff = plus - minus if dy is None else xp.sum(dy * (plus - minus))
        gflat[k] = float(diff) / (2 * eps)
    return grad


def relative_error(analytic, numeric, abs_floor=0.0):
    """Element-wise |a - n| / max(|a|, |n|, 1e-3 max|n|, abs_floor) as a host array (see the module docstring)."""
    a, n = to_host(analytic).astype(numpy.float64), to_host(numeric).astype(numpy.float64)
    if a.shape != n.shape:
        raise ValueError(f"analytic gradient has shape {a.shape}, numeric {n.shape}")
    floor = max(1e-3 * float(numpy.abs(n).max(initial=0.0)), abs_floor, 1e-300)
    return numpy.abs(a - n) / numpy.maximum(numpy.maximum(numpy.abs(a), numpy.abs(n)), floor)


def compare(tensors, analytic, loss_fn, eps=DEFAULT_EPS, tol=DEFAULT_TOL, dy=None):
    """Check ``analytic[name]`` against the numeric gradient of ``loss_fn()`` for every ``tensors[name]``.

    ``loss_fn`` returns a scalar, or with ``dy`` an output y for the loss sum(dy * y). Returns ``{name: max relative error}``; raises GradcheckError naming the first tensor and element over ``tol``.
    """
    report, failures = {}, []
    value = loss_fn()
    scale = abs(float(value)) if dy is None else float(array_module(value).abs(dy * value).sum())
    roundoff = 4 * numpy.finfo(numpy.float64).eps * scale / eps
    for name, t in tensors.items():
        _require_float64(name, t)
        numeric = numerical_gradient(loss_fn, t, eps, dy)
        err = relative_error(analytic[name], numeric, roundoff / tol)
        report[name] = float(err.max(initial=0.0))
        if report[name] > tol:
            idx = numpy.unravel_index(int(err.argmax()), err.shape)
            a, n = to_host(analytic[name])[idx], to_host(numeric)[idx]
            failures.append(f"{name}{list(map(int, idx))}: analytic {a:.10g}, numeric {n:.10g}, "
                            f"relative error {report[name]:.3g} > {tol:g}")
    if failures:
        raise GradcheckError("gradient mismatch in " + "; ".join(failures))
    return report


def _random_like(rng, y):
    return rng.standard_normal(y.shape)


def check_module(module, x, rng, eps=DEFAULT_EPS, tol=DEFAULT_TOL):
    """Gradient-check a layer: dL/dx and dL/dparam for L = sum(dy * module(x)) with a random dy.

    ``rng`` is a device Generator (``backend.rng(seed)``). Returns ``{'x': err, param: err, ...}``.
    The module stays in its current mode; in train mode BatchNorm's running statistics are updated by
    each forward pass, which does not affect the output in that mode.
    """
    y = module.forward(x)
    dy = _random_like(rng, y)
    module.zero_grad()
    dx = module.backward(dy)
    # a layer told to skip its input gradient (input_grad False) returns None: check the parameters only
    analytic = {} if dx is None else {"x": dx.copy()}
    analytic.update({name: g.copy() for name, _, g in module.named_parameters()})
    tensors = {} if dx is None else {"x": x}
    tensors.update({name: p for name, p, _ in module.named_parameters()})
    return compare(tensors, analytic, lambda: module.forward(x), eps, tol, dy)


def check_function(forward, backward, inputs, rng, eps=DEFAULT_EPS, tol=DEFAULT_TOL):
    """Gradient-check a function with a hand-written backward.

    ``forward(*inputs)`` returns an array (or scalar) y; ``backward(dy)``, called right after it, returns
    the gradients of sum(dy * y) with respect to each input, in order. ``inputs`` is a dict name -> array.
    Returns ``{name: max relative error}``.
    """
    names, arrays = list(inputs), list(inputs.values())
    y = forward(*arrays)
    xp = array_module(*arrays)
    dy = _random_like(rng, xp.asarray(y))
    grads = backward(dy)
    if len(grads) != len(names):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(names)} inputs {names}")
    analytic = {n: xp.asarray(g).copy() for n, g in zip(names, grads)}
    return compare(dict(zip(names, arrays)), analytic, lambda: xp.asarray(forward(*arrays)), eps, tol, dy)


def directional_check(loss_fn, tensors, analytic, rng, eps=DEFAULT_EPS, n_directions=1):
    """Relative error of the directional derivative of ``loss_fn()`` along random directions.

    For each direction d (standard normal over every tensor at once, scaled to unit norm):
    numeric = (L(theta + h d) - L(theta - h d)) / 2h, analytic = sum over tensors of <grad, d>.
    Returns the largest |numeric - analytic| / max(|numeric|, |analytic|) over the directions.
    Two forward passes per direction, so it scales to a whole model.
    """
    worst = 0.0
    for _ in range(n_directions):
        dirs = {k: rng.standard_normal(t.shape) for k, t in tensors.items()}
        norm = sum(float((d * d).sum()) for d in dirs.values()) ** 0.5
        for k, t in tensors.items():
            _require_float64(k, t)
            dirs[k] /= norm
        expected = sum(float((analytic[k] * dirs[k]).sum()) for k in tensors)
        saved = {k: t.copy() for k, t in tensors.items()}
        for k, t in tensors.items():
            t += eps * dirs[k]
        plus = float(loss_fn())
        for k, t in tensors.items():
            t[...] = saved[k] - eps * dirs[k]
        minus = float(loss_fn())
        for k, t in tensors.items():
            t[...] = saved[k]  # exactly as before, not merely up to rounding
        numeric = (plus - minus) / (2 * eps)
        worst = max(worst, abs(numeric - expected) / max(abs(numeric), abs(expected), 1e-30))
    return worst
