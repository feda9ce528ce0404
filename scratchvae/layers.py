"""Layers with hand-written backward passes.

The protocol every layer follows (``Module``):

* ``forward(x)`` computes the output and caches exactly what ``backward`` will need;
* ``backward(dy)`` takes dL/dy, returns dL/dx, and **adds** dL/dparam into ``self.grads[name]``
  (same keys as ``self.params``), so gradients of several backward calls accumulate until ``zero_grad()``.

Activations are **channels-last**: images are ``(N, H, W, C)``. With that layout the rows that a
convolution gathers for one kernel offset are contiguous runs of C numbers, and the matrix product's
output ``(N*OH*OW, C_out)`` already *is* the next activation: no transposes between layers. Weights keep
PyTorch's layouts so a reader can compare: Linear ``W (out, in)``, Conv2d ``W (out, in, kh, kw)``,
ConvTranspose2d ``W (in, out, kh, kw)``, biases ``b (out,)``, BatchNorm ``gamma``, ``beta``.

Nothing here imports NumPy: every array op goes through ``xp``, the module owning the arrays
(NumPy or CuPy, see ``backend``).
"""
from __future__ import annotations

import math

from . import backend
from .backend import array_module


class Module:
    """Base class: parameters, their gradients, buffers, train/eval mode and state dicts."""

    def __init__(self):
        self.params = {}    # name -> array, updated by the optimiser
        self.grads = {}     # name -> array of the same shape, filled by backward
        self.buffers = {}   # name -> array that is state but not trained (BatchNorm running stats)
        self.training = True

    # -- the protocol -------------------------------------------------------------------------
    def forward(self, x):
        """Compute the output for input ``x`` and cache what backward needs."""
        raise NotImplementedError

    def backward(self, dy):
        """Given dL/dy, return dL/dx and add dL/dparam into ``self.grads``."""
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # -- parameters -----------------------------------------------------------------------------
    def children(self):
        """Sub-modules, in order (empty for a plain layer)."""
        return []

    def _add_param(self, name, value):
        xp = array_module(value)
        self.params[name] = value
        self.grads[name] = xp.zeros_like(value)

    def named_modules(self, prefix=""):
        """Yield ``(dotted_name, module)`` for this module and all below it."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_children(self):
        """Yield ``(name, child)``; Sequential names its children 0, 1, 2, ..."""
        return enumerate(self.children())

    def named_parameters(self):
        """Yield ``(dotted_name, param, grad)`` for every trainable array."""
        for prefix, mod in self.named_modules():
            for name, p in mod.params.items():
                yield prefix + name, p, mod.grads[name]

    def named_buffers(self):
        """Yield ``(dotted_name, buffer)`` for every non-trainable state array."""
        for prefix, mod in self.named_modules():
            for name, b in mod.buffers.items():
                yield prefix + name, b

    def zero_grad(self):
        """Set every parameter gradient to zero (backward accumulates into them)."""
        for _, _, g in self.named_parameters():
            g[...] = 0

    def train(self, mode=True):
        """Training mode (BatchNorm uses batch statistics); returns self."""
        for _, mod in self.named_modules():
            mod.training = mode
        return self

    def eval(self):
        """Evaluation mode (BatchNorm uses running statistics); returns self."""
        return self.train(False)

    def state_dict(self):
        """Every parameter and buffer by dotted name (the arrays themselves, not copies)."""
        state = {name: p for name, p, _ in self.named_parameters()}
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state):
        """Copy arrays from ``state`` into this module's parameters and buffers, in place.

        Raises KeyError/ValueError naming the missing, unexpected or mis-shaped entries.
        """
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
        for name, dst in own.items():
            src = state[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"shape mismatch for {name!r}: model has {tuple(dst.shape)}, "
                                 f"state dict has {tuple(src.shape)}")
            dst[...] = array_module(dst).asarray(src, dtype=dst.dtype)

    def num_parameters(self):
        """How many trainable numbers the module holds."""
        return sum(int(p.size) for _, p, _ in self.named_parameters())


def _uniform(rng, shape, bound, dtype):
    """U(-bound, bound) samples of ``shape``, drawn from an explicit generator."""
    return (rng.random(shape) * (2 * bound) - bound).astype(dtype)


def _init_rng(rng):
    return rng if rng is not None else backend.rng(0)


class Linear(Module):
    r"""Fully connected layer: :math:`y = x W^\top + b`, x ``(N, in)``, W ``(out, in)``, y ``(N, out)``.

    Initialised like PyTorch: W and b ~ U(-1/sqrt(in), 1/sqrt(in)).
    """

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=None):
        super().__init__()
        rng, dtype = _init_rng(rng), dtype or backend.get_default_dtype()
        bound = 1.0 / math.sqrt(in_features)
        self._add_param("W", _uniform(rng, (out_features, in_features), bound, dtype))
        if bias:
            self._add_param("b", _uniform(rng, (out_features,), bound, dtype))

    def forward(self, x):
        self.x = x
        y = x @ self.params["W"].T
        if "b" in self.params:
            y += self.params["b"]
        return y

    def backward(self, dy):
        # dL/dW = dy^T x,  dL/db = sum_n dy,  dL/dx = dy W
        self.grads["W"] += dy.T @ self.x
        if "b" in self.params:
            self.grads["b"] += dy.sum(axis=0)
        return dy @ self.params["W"]


# ---- convolution: im2col / col2im on strided views -------------------------------------------------

def conv_output_size(size, k, stride, padding):
    """Output length of a convolution along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - k) // stride + 1


def pad_hw(x, padding):
    """Zero-pad the H and W axes of an NHWC array by ``padding`` on each side."""
    if padding == 0:
        return x
    xp = array_module(x)
    n, h, w, c = x.shape
    out = xp.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=x.dtype)
    out[:, padding:padding + h, padding:padding + w, :] = x
    return out


def im2col(xpad, kh, kw, stride, oh, ow):
    """Gather the patches of a padded NHWC array into columns ``(N, OH, OW, kh, kw, C)``.

    One strided slice per kernel offset (i, j): the input pixels that offset meets at every output
    position are ``xpad[:, i : i + s*OH : s, j : j + s*OW : s, :]``. Reshaped to ``(N*OH*OW, kh*kw*C)``
    the result multiplies a ``(kh*kw*C, C_out)`` weight matrix to give the convolution.
    """
    xp = array_module(xpad)
    n, c = xpad.shape[0], xpad.shape[3]
    col = xp.empty((n, oh, ow, kh, kw, c), dtype=xpad.dtype)
    for i in range(kh):
        for j in range(kw):
            col[:, :, :, i, j, :] = xpad[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
    return col


def col2im(col, padded_shape, stride):
    """Adjoint of ``im2col``: add columns ``(N, OH, OW, kh, kw, C)`` back onto a padded NHWC array.

    Overlapping patches add up; each kernel offset is one strided slice-add, so no scatter-add is needed.
    """
    xp = array_module(col)
    _, oh, ow, kh, kw, _ = col.shape
    out = xp.zeros(padded_shape, dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] += col[:, :, :, i, j, :]
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class Conv2d(Module):
    r"""2-D convolution (cross-correlation, as in PyTorch) on NHWC input.

    :math:`y[n, p, q, o] = b_o + \sum_{i, j, c} W[o, c, i, j]\, x_{pad}[n, s p + i, s q + j, c]`.
    x ``(N, H, W, C_in)`` -> y ``(N, OH, OW, C_out)``, OH = floor((H + 2 pad - kh) / s) + 1.
    Computed as im2col followed by one matrix product. Initialised like PyTorch (fan_in = C_in*kh*kw).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype=None):
        super().__init__()
        rng, dtype = _init_rng(rng), dtype or backend.get_default_dtype()
        self.kh, self.kw = _pair(kernel_size)
        self.stride, self.padding = stride, padding
        self.in_channels, self.out_channels = in_channels, out_channels
        bound = 1.0 / math.sqrt(in_channels * self.kh * self.kw)
        self._add_param("W", _uniform(rng, (out_channels, in_channels, self.kh, self.kw), bound, dtype))
        if bias:
            self._add_param("b", _uniform(rng, (out_channels,), bound, dtype))

    def _wmat(self):
        # (out, in, kh, kw) -> (kh*kw*in, out): rows ordered like the columns of im2col
        return self.params["W"].transpose(2, 3, 1, 0).reshape(-1, self.out_channels)

    def forward(self, x):
        n, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels (NHWC), got shape {x.shape}")
        oh = conv_output_size(h, self.kh, self.stride, self.padding)
        ow = conv_output_size(w, self.kw, self.stride, self.padding)
        xpad = pad_hw(x, self.padding)
        col = im2col(xpad, self.kh, self.kw, self.stride, oh, ow).reshape(n * oh * ow, -1)
        y = col @ self._wmat()
        if "b" in self.params:
            y += self.params["b"]
        self.col, self.padded_shape = col, xpad.shape
        self.x_shape, self.out_hw = x.shape, (oh, ow)
        return y.reshape(n, oh, ow, self.out_channels)

    def backward(self, dy):
        n, h, w, c = self.x_shape
        oh, ow = self.out_hw
        dy2 = dy.reshape(-1, self.out_channels)
        # dW = col^T dy, reshaped back to PyTorch's (out, in, kh, kw)
        dw = (self.col.T @ dy2).reshape(self.kh, self.kw, c, self.out_channels)
        self.grads["W"] += dw.transpose(3, 2, 0, 1)
        if "b" in self.params:
            self.grads["b"] += dy2.sum(axis=0)
        dcol = (dy2 @ self._wmat().T).reshape(n, oh, ow, self.kh, self.kw, c)
        dxpad = col2im(dcol, self.padded_shape, self.stride)
        p = self.padding
        return dxpad[:, p:p + h, p:p + w, :]


class ConvTranspose2d(Module):
    r"""Transposed convolution on NHWC input: the adjoint of Conv2d (its forward is Conv2d's backward to x).

    Every input pixel scatters ``x[n, h, w, :] @ W[:, :, i, j]`` onto output pixel ``(s h + i - pad, s w + j - pad)``.
    x ``(N, H, W, C_in)`` -> y ``(N, OH, OW, C_out)``, OH = (H - 1) s - 2 pad + kh + output_padding.
    W has PyTorch's layout ``(C_in, C_out, kh, kw)``; initialised like PyTorch (fan_in = C_out*kh*kw).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 bias=True, rng=None, dtype=None):
        super().__init__()
        rng, dtype = _init_rng(rng), dtype or backend.get_default_dtype()
        self.kh, self.kw = _pair(kernel_size)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        if not 0 <= output_padding < stride:
            raise ValueError(f"output_padding must be in [0, stride), got {output_padding} with stride {stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        bound = 1.0 / math.sqrt(out_channels * self.kh * self.kw)
        self._add_param("W", _uniform(rng, (in_channels, out_channels, self.kh, self.kw), bound, dtype))
        if bias:
            self._add_param("b", _uniform(rng, (out_channels,), bound, dtype))

    def _wmat(self):
        # (in, out, kh, kw) -> (in, kh*kw*out): columns ordered like im2col's (i, j, c)
        return self.params["W"].transpose(0, 2, 3, 1).reshape(self.in_channels, -1)

    def forward(self, x):
        n, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"ConvTranspose2d expects {self.in_channels} input channels (NHWC), "
                             f"got shape {x.shape}")
        s, p = self.stride, self.padding
        oh = (h - 1) * s - 2 * p + self.kh + self.output_padding
        ow = (w - 1) * s - 2 * p + self.kw + self.output_padding
        x2 = x.reshape(-1, c)
        col = (x2 @ self._wmat()).reshape(n, h, w, self.kh, self.kw, self.out_channels)
        ypad = col2im(col, (n, oh + 2 * p, ow + 2 * p, self.out_channels), s)
        y = ypad[:, p:p + oh, p:p + ow, :]
        if "b" in self.params:
            y = y + self.params["b"]
        self.x2, self.in_hw = x2, (h, w)
        return y

    def backward(self, dy):
        n, oh, ow, _ = dy.shape
        h, w = self.in_hw
        dypad = pad_hw(dy, self.padding)
        dcol = im2col(dypad, self.kh, self.kw, self.stride, h, w).reshape(n * h * w, -1)
        dw = self.x2.T @ dcol  # (in, kh*kw*out)
        self.grads["W"] += dw.reshape(self.in_channels, self.kh, self.kw, self.out_channels).transpose(0, 3, 1, 2)
        if "b" in self.params:
            self.grads["b"] += dy.reshape(-1, self.out_channels).sum(axis=0)
        return (dcol @ self._wmat().T).reshape(n, h, w, self.in_channels)


class BatchNorm2d(Module):
    r"""Batch normalisation over every axis but the last (channels): NHWC images or ``(N, C)`` vectors.

    Train mode: :math:`\hat x = (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon}`, :math:`y = \gamma \hat x + \beta`,
    with the batch mean and (biased) variance, and running estimates updated with ``momentum``
    (the running variance uses the unbiased batch variance, as PyTorch does). Eval mode uses the
    running estimates, so y is an affine function of x.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=None):
        super().__init__()
        xp = backend.get_xp()
        dtype = dtype or backend.get_default_dtype()
        self.eps, self.momentum = eps, momentum
        self._add_param("gamma", xp.ones(num_features, dtype=dtype))
        self._add_param("beta", xp.zeros(num_features, dtype=dtype))
        self.buffers["running_mean"] = xp.zeros(num_features, dtype=dtype)
        self.buffers["running_var"] = xp.ones(num_features, dtype=dtype)

    def forward(self, x):
        axes = tuple(range(x.ndim - 1))
        if self.training:
            mean = x.mean(axis=axes)
            var = x.var(axis=axes)
            m = x.size // x.shape[-1]
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm += self.momentum * (mean - rm)
            rv += self.momentum * (var * (m / max(m - 1, 1)) - rv)
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        inv_std = 1.0 / array_module(x).sqrt(var + self.eps)
        xhat = (x - mean) * inv_std
        self.xhat, self.inv_std = xhat, inv_std
        return xhat * self.params["gamma"] + self.params["beta"]

    def backward(self, dy):
        axes = tuple(range(dy.ndim - 1))
        xhat, gamma = self.xhat, self.params["gamma"]
        self.grads["gamma"] += (dy * xhat).sum(axis=axes)
        self.grads["beta"] += dy.sum(axis=axes)
        if not self.training:
            return dy * (gamma * self.inv_std)
        # Through mean and variance: dx = gamma/sigma * (dy - mean(dy) - xhat * mean(dy * xhat))
        return (gamma * self.inv_std) * (dy - dy.mean(axis=axes) - xhat * (dy * xhat).mean(axis=axes))


# ---- elementwise -----------------------------------------------------------------------------------

class LeakyReLU(Module):
    """y = x for x > 0, slope * x otherwise (PyTorch's default slope 0.01)."""

    def __init__(self, slope=0.01):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        self.positive = x > 0
        return array_module(x).where(self.positive, x, x * self.slope)

    def backward(self, dy):
        return array_module(dy).where(self.positive, dy, dy * self.slope)


class ReLU(LeakyReLU):
    """y = max(x, 0)."""

    def __init__(self):
        super().__init__(slope=0.0)


class Sigmoid(Module):
    """y = 1 / (1 + exp(-x)); dy/dx = y (1 - y)."""

    def forward(self, x):
        xp = array_module(x)
        # exp of a non-positive number never overflows: use the form that fits the sign of x
        e = xp.exp(-xp.abs(x))
        self.y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return self.y

    def backward(self, dy):
        return dy * self.y * (1 - self.y)


class Tanh(Module):
    """y = tanh(x); dy/dx = 1 - y^2."""

    def forward(self, x):
        self.y = array_module(x).tanh(x)
        return self.y

    def backward(self, dy):
        return dy * (1 - self.y * self.y)


# ---- shape -----------------------------------------------------------------------------------------

class Flatten(Module):
    """(N, ...) -> (N, prod(...)); backward restores the shape."""

    def forward(self, x):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self.shape)


class Reshape(Module):
    """(N, ...) -> (N, *shape); backward restores the input shape."""

    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape((x.shape[0],) + self.shape)

    def backward(self, dy):
        return dy.reshape(self.in_shape)


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse (the chain rule)."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = list(layers)

    def children(self):
        return self.layers

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)
