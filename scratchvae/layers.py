"""The reference engine: every layer in its textbook form, each backward right under its forward.

The protocol every layer follows (``Module``):

* ``forward(x)`` computes the output and caches exactly what ``backward`` will need;
* ``backward(dy)`` takes dL/dy, returns dL/dx, and **adds** dL/dparam into ``self.grads[name]``
  (same keys as ``self.params``), so gradients of several backward calls accumulate until ``zero_grad()``.

Images are **channels-last** inside the network: ``(N, H, W, C)``. Weights keep PyTorch's layouts so a
reader can compare: Linear ``W (out, in)``, Conv2d ``W (out, in, kh, kw)``, ConvTranspose2d
``W (in, out, kh, kw)``, biases ``b (out,)``, BatchNorm ``gamma``, ``beta``.

This file is written to be read, and it is the oracle the fast engine (``scratchvae/fast/``, the default for
training) is tested against: the fast layers subclass these, keep their parameters, and give the same numbers.
Nothing here imports NumPy: every array operation goes through ``xp``, the module that owns the arrays
(NumPy or CuPy, see ``backend``), so the same code runs on both.
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
        self.buffers = {}   # name -> array that is state but not trained (BatchNorm's running statistics)
        self.training = True
        self.input_grad = True  # False: backward skips dL/dx and returns None (a first layer, fed data)

    def forward(self, x):
        """Compute the output for input ``x`` and cache what backward needs."""
        raise NotImplementedError

    def backward(self, dy):
        """Given dL/dy, return dL/dx (None when ``input_grad`` is False) and add dL/dparam into ``self.grads``."""
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def __getattr__(self, name):
        # only reached for an attribute that is not there: most often backward reading a cache forward never made
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}; if backward() is asking, call "
                             "forward() first: backward() uses what forward() cached")

    def _add_param(self, name, value):
        self.params[name] = value
        self.grads[name] = array_module(value).zeros_like(value)

    # -- the tree of modules ------------------------------------------------------------------
    def children(self):
        """Sub-modules, in order (empty for a plain layer)."""
        return []

    def named_children(self):
        """``(name, child)`` pairs; Sequential names its children 0, 1, 2, ..."""
        return enumerate(self.children())

    def named_modules(self, prefix=""):
        """Yield ``(dotted_name, module)`` for this module and all below it."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

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

    # -- state ------------------------------------------------------------------------------------
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
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")
        for name, dst in own.items():
            src = state[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"shape mismatch for {name!r}: model has {tuple(dst.shape)}, "
                                 f"state dict has {tuple(src.shape)}")
            dst[...] = array_module(dst).asarray(src, dtype=dst.dtype)

    def snapshot_buffers(self):
        """A copy of every buffer (BatchNorm's running statistics), for ``restore_buffers``."""
        return {name: b.copy() for name, b in self.named_buffers()}

    def restore_buffers(self, snapshot):
        """Put back the buffers' values of ``snapshot_buffers``, in place."""
        for name, b in self.named_buffers():
            b[...] = snapshot[name]

    def num_parameters(self):
        """How many trainable numbers the module holds."""
        return sum(int(p.size) for _, p, _ in self.named_parameters())


def _uniform(rng, shape, bound, dtype):
    """U(-bound, bound) samples of ``shape``, drawn from an explicit generator."""
    return (rng.random(shape) * (2 * bound) - bound).astype(dtype)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _positive_int(what, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _conv_geometry(layer, in_channels, out_channels, kernel_size, stride, padding):
    """Store a convolution's channels, kernel, stride and padding, each checked (a ValueError names a bad one)."""
    name = type(layer).__name__
    layer.in_channels = _positive_int(f"{name}'s in_channels", in_channels)
    layer.out_channels = _positive_int(f"{name}'s out_channels", out_channels)
    layer.kh, layer.kw = (_positive_int(f"{name}'s kernel_size", k) for k in _pair(kernel_size))
    layer.stride = _positive_int(f"{name}'s stride", stride)
    layer.padding = _positive_int(f"{name}'s padding", padding, minimum=0)


class Linear(Module):
    r"""Fully connected layer: :math:`y = x W^\top + b`, x ``(N, in)``, W ``(out, in)``, y ``(N, out)``.

    Initialised like PyTorch: W and b ~ U(-1/sqrt(in), 1/sqrt(in)).
    """

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=None):
        super().__init__()
        _positive_int("Linear's in_features", in_features)
        _positive_int("Linear's out_features", out_features)
        rng, dtype = rng or backend.rng(0), dtype or backend.get_default_dtype()
        bound = 1.0 / math.sqrt(in_features)
        self._add_param("W", _uniform(rng, (out_features, in_features), bound, dtype))
        if bias:
            self._add_param("b", _uniform(rng, (out_features,), bound, dtype))

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.params["W"].shape[1]:
            raise ValueError(f"Linear expects inputs (N, {self.params['W'].shape[1]}), got shape {x.shape}")
        self.x = x
        y = x @ self.params["W"].T
        return y + self.params["b"] if "b" in self.params else y

    def backward(self, dy):
        # dL/dW = dy^T x,  dL/db = sum_n dy,  dL/dx = dy W
        self.grads["W"] += dy.T @ self.x
        if "b" in self.params:
            self.grads["b"] += dy.sum(axis=0)
        return dy @ self.params["W"] if self.input_grad else None


# ---- convolution as im2col and a matrix product --------------------------------------------------------

def conv_output_size(size, k, stride, padding):
    """Output length of a convolution along one axis: floor((size + 2 pad - k) / stride) + 1."""
    return (size + 2 * padding - k) // stride + 1


def im2col(x, kh, kw, stride, padding):
    r"""Every kh x kw window of NHWC ``x`` (zero-padded by ``padding``) as one row of a matrix.

    :math:`\mathrm{col}[(n, p, q), (i, j, c)] = x_{pad}[n, s p + i, s q + j, c]`, shape ``(N*OH*OW, kh*kw*C)``.
    One strided slice of the padded image per kernel offset (i, j): ``x_pad[:, i::s, j::s, :]``, cut to OH x OW.
    """
    xp = array_module(x)
    n, h, w, c = x.shape
    oh, ow = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    xpad = xp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    col = xp.empty((n, oh, ow, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            col[:, :, :, i, j, :] = xpad[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
    return col.reshape(n * oh * ow, kh * kw * c)


def col2im(col, x_shape, kh, kw, stride, padding):
    """The adjoint of ``im2col``: every row's window added back onto the image it came from, NHWC ``x_shape``.

    Where windows overlap, their numbers add up: that is the sum over all output positions a pixel feeds.
    """
    xp = array_module(col)
    n, h, w, c = x_shape
    oh, ow = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    col = col.reshape(n, oh, ow, kh, kw, c)
    xpad = xp.zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            xpad[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :] += col[:, :, :, i, j, :]
    return xpad[:, padding:padding + h, padding:padding + w, :]


class Conv2d(Module):
    r"""2-D convolution (cross-correlation, as in PyTorch) on NHWC input.

    :math:`y[n, p, q, o] = b_o + \sum_{i, j, c} W[o, c, i, j]\, x_{pad}[n, s p + i, s q + j, c]`, i.e.
    ``y = im2col(x) @ Wmat + b`` with ``Wmat`` = W as ``(kh*kw*C_in, C_out)``.
    x ``(N, H, W, C_in)`` -> y ``(N, OH, OW, C_out)``, OH = floor((H + 2 pad - kh) / s) + 1.
    Initialised like PyTorch: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C_in*kh*kw.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, rng=None, dtype=None):
        super().__init__()
        _conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding)
        rng, dtype = rng or backend.rng(0), dtype or backend.get_default_dtype()
        bound = 1.0 / math.sqrt(in_channels * self.kh * self.kw)
        self._add_param("W", _uniform(rng, (out_channels, in_channels, self.kh, self.kw), bound, dtype))
        if bias:
            self._add_param("b", _uniform(rng, (out_channels,), bound, dtype))

    def _wmat(self):
        # (out, in, kh, kw) -> (kh*kw*in, out): rows ordered like the columns of im2col, (i, j, c)
        return self.params["W"].transpose(2, 3, 1, 0).reshape(-1, self.out_channels)

    def check_input(self, x):
        """The output's (OH, OW); a ValueError naming the problem unless x is ``(N, H, W, C_in)`` the kernel fits."""
        if x.ndim != 4 or x.shape[3] != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels, channels-last "
                             f"(NHWC: N, H, W, {self.in_channels}), got shape {x.shape}")
        oh = conv_output_size(x.shape[1], self.kh, self.stride, self.padding)
        ow = conv_output_size(x.shape[2], self.kw, self.stride, self.padding)
        if oh < 1 or ow < 1:
            raise ValueError(f"a {self.kh}x{self.kw} kernel with padding {self.padding} does not fit {x.shape[1]}x"
                             f"{x.shape[2]} images: use larger images, more padding or a smaller kernel")
        return oh, ow

    def forward(self, x):
        oh, ow = self.check_input(x)
        self.x_shape = x.shape
        self.col = im2col(x, self.kh, self.kw, self.stride, self.padding)  # (N*OH*OW, kh*kw*C_in)
        y = self.col @ self._wmat()
        if "b" in self.params:
            y += self.params["b"]
        return y.reshape(x.shape[0], oh, ow, self.out_channels)

    def backward(self, dy):
        # dL/dWmat = col^T dy,  dL/db = sum over pixels of dy,  dL/dcol = dy Wmat^T, then col2im to dL/dx
        dy = dy.reshape(-1, self.out_channels)
        dwmat = self.col.T @ dy
        self.grads["W"] += dwmat.reshape(self.kh, self.kw, self.in_channels, self.out_channels).transpose(3, 2, 0, 1)
        if "b" in self.params:
            self.grads["b"] += dy.sum(axis=0)
        if not self.input_grad:
            return None
        return col2im(dy @ self._wmat().T, self.x_shape, self.kh, self.kw, self.stride, self.padding)


class ConvTranspose2d(Module):
    r"""Transposed convolution on NHWC input: the adjoint of a Conv2d with the same kernel, stride and padding.

    Every input pixel scatters :math:`x[n, h, w, :] \cdot W[:, :, i, j]` onto output pixel (s h + i - pad,
    s w + j - pad): ``y = col2im(x @ Wmat) + b``, with ``Wmat`` = W as ``(C_in, kh*kw*C_out)``.
    x ``(N, H, W, C_in)`` -> y ``(N, OH, OW, C_out)``, OH = (H - 1) s - 2 pad + kh + output_padding.
    W has PyTorch's layout ``(C_in, C_out, kh, kw)``; initialised like PyTorch (fan_in = C_out*kh*kw).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 bias=True, rng=None, dtype=None):
        super().__init__()
        _conv_geometry(self, in_channels, out_channels, kernel_size, stride, padding)
        if not (isinstance(output_padding, int) and 0 <= output_padding < stride):
            raise ValueError(f"output_padding must be in [0, stride), got {output_padding} with stride {stride}")
        self.output_padding = output_padding
        rng, dtype = rng or backend.rng(0), dtype or backend.get_default_dtype()
        bound = 1.0 / math.sqrt(out_channels * self.kh * self.kw)
        self._add_param("W", _uniform(rng, (in_channels, out_channels, self.kh, self.kw), bound, dtype))
        if bias:
            self._add_param("b", _uniform(rng, (out_channels,), bound, dtype))

    def _wmat(self):
        # (in, out, kh, kw) -> (in, kh*kw*out): columns ordered like im2col's, (i, j, o)
        return self.params["W"].transpose(0, 2, 3, 1).reshape(self.in_channels, -1)

    def check_input(self, x):
        """The output's (OH, OW); a ValueError naming the problem unless x is ``(N, H, W, C_in)``."""
        if x.ndim != 4 or x.shape[3] != self.in_channels:
            raise ValueError(f"ConvTranspose2d expects {self.in_channels} input channels, channels-last "
                             f"(NHWC: N, H, W, {self.in_channels}), got shape {x.shape}")
        (h, w), s = x.shape[1:3], self.stride
        oh = (h - 1) * s - 2 * self.padding + self.kh + self.output_padding
        ow = (w - 1) * s - 2 * self.padding + self.kw + self.output_padding
        if oh < 1 or ow < 1:
            raise ValueError(f"padding {self.padding} crops the whole {h}x{w} input's output: use less padding")
        return oh, ow

    def forward(self, x):
        oh, ow = self.check_input(x)
        self.x_shape = x.shape
        self.x2 = x.reshape(-1, self.in_channels)  # (N*H*W, C_in)
        y = col2im(self.x2 @ self._wmat(), (x.shape[0], oh, ow, self.out_channels), self.kh, self.kw, self.stride,
                   self.padding)
        return y + self.params["b"] if "b" in self.params else y

    def backward(self, dy):
        # the windows of dy that every input pixel scattered onto: im2col of dy, shape (N*H*W, kh*kw*C_out);
        # dL/dWmat = x^T dcol,  dL/db = sum over pixels of dy,  dL/dx = dcol Wmat^T
        dcol = im2col(dy, self.kh, self.kw, self.stride, self.padding)
        dwmat = self.x2.T @ dcol
        self.grads["W"] += dwmat.reshape(self.in_channels, self.kh, self.kw, self.out_channels).transpose(0, 3, 1, 2)
        if "b" in self.params:
            self.grads["b"] += dy.reshape(-1, self.out_channels).sum(axis=0)
        if not self.input_grad:
            return None
        return (dcol @ self._wmat().T).reshape(self.x_shape)


# ---- normalisation -------------------------------------------------------------------------------------

class BatchNorm2d(Module):
    r"""Batch normalisation over every axis but the last (channels): NHWC images or ``(N, C)`` vectors.

    Train mode, with the batch's mean and (biased) variance over the m numbers of each channel:

    .. math::
        \mu = \tfrac1m \sum x, \quad \sigma^2 = \tfrac1m \sum (x - \mu)^2, \quad
        \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, \quad y = \gamma \hat x + \beta

    and the running estimates move by ``momentum`` towards the batch's (the variance's unbiased, as in
    PyTorch). Eval mode uses the running estimates instead, so y is an affine function of x.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=None):
        super().__init__()
        _positive_int("BatchNorm2d's num_features", num_features)
        xp, dtype = backend.get_xp(), dtype or backend.get_default_dtype()
        self.eps, self.momentum = eps, momentum
        self._add_param("gamma", xp.ones(num_features, dtype=dtype))
        self._add_param("beta", xp.zeros(num_features, dtype=dtype))
        self.buffers["running_mean"] = xp.zeros(num_features, dtype=dtype)
        self.buffers["running_var"] = xp.ones(num_features, dtype=dtype)

    def check_input(self, x):
        """The number of values each channel's statistics are taken over; a ValueError on the wrong channel count."""
        c = len(self.params["gamma"])
        if x.ndim < 2 or x.shape[-1] != c:
            raise ValueError(f"BatchNorm2d expects {c} channels on the last axis, got shape {x.shape}")
        return x.size // c

    def forward(self, x):
        m, xp = self.check_input(x), array_module(x)
        axes = tuple(range(x.ndim - 1))
        if self.training:
            # summed in float64: float32 sums over a large batch lose digits
            mean, var = x.mean(axis=axes, dtype=xp.float64), x.var(axis=axes, dtype=xp.float64)
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm += self.momentum * (mean - rm)
            rv += self.momentum * (var * (m / max(m - 1, 1)) - rv)
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        self.inv_std = (1 / xp.sqrt(var + self.eps)).astype(x.dtype)
        self.xhat = (x - mean.astype(x.dtype)) * self.inv_std
        return self.params["gamma"] * self.xhat + self.params["beta"]

    def backward(self, dy):
        # dL/dgamma = sum dy xhat,  dL/dbeta = sum dy,  g = dL/dxhat = gamma dy; in train mode mean and variance
        # depend on x too: dL/dx = (g - mean(g) - xhat mean(g xhat)) / sigma
        axes = tuple(range(dy.ndim - 1))
        self.grads["gamma"] += (dy * self.xhat).sum(axis=axes)
        self.grads["beta"] += dy.sum(axis=axes)
        g = dy * self.params["gamma"]
        if not self.training:
            return g * self.inv_std
        return (g - g.mean(axis=axes) - self.xhat * (g * self.xhat).mean(axis=axes)) * self.inv_std


# ---- elementwise -------------------------------------------------------------------------------------

class LeakyReLU(Module):
    """y = x for x > 0, slope * x otherwise (PyTorch's default slope 0.01); dy/dx = 1 or slope."""

    def __init__(self, slope=0.01):
        super().__init__()
        if not 0 <= slope <= 1:
            raise ValueError(f"LeakyReLU's slope must lie in [0, 1], got {slope}")
        self.slope = slope

    def forward(self, x):
        self.positive = x > 0
        return array_module(x).where(self.positive, x, self.slope * x)

    def backward(self, dy):
        return array_module(dy).where(self.positive, dy, self.slope * dy)


class ReLU(LeakyReLU):
    """y = max(x, 0)."""

    def __init__(self):
        super().__init__(slope=0.0)


def sigmoid(x):
    """The logistic function 1 / (1 + exp(-x)), with x clipped to [-80, 80] so that exp cannot overflow float32."""
    return 1 / (1 + array_module(x).exp(-array_module(x).clip(x, -80, 80)))


class Sigmoid(Module):
    """y = sigmoid(x); dy/dx = y (1 - y)."""

    def forward(self, x):
        self.y = sigmoid(x)
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


# ---- shape and composition --------------------------------------------------------------------------

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
