"""The fast engine's BatchNorm: per-channel arithmetic on long rows, piece by piece in cache; fused kernels on a GPU.

BatchNorm and the activations are a handful of whole-array operations each. Four habits keep them near the
speed of memory: every operation writes into an array that already exists (``out=``, ``+=``); a per-channel
vector is applied to long rows of k*C numbers (k pixels side by side, the vector tiled k times,
``channel_rows``), because NumPy's inner loop restarts at every row of a broadcast; plain sums over pixels
are matrix-vector products with a vector of ones, their k partial sums per channel added in float64; and the
operations that follow each other over one activation run piece by piece (``pieces``, ``PIECE``), so that an
activation larger than the cache is read from main memory once. On a GPU each stage is one fused kernel.
"""
from __future__ import annotations

from .. import layers
from ..backend import array_module, is_device_array
from . import kernels
from .threads import each_piece
from .workspace import Workspace, piece_rows

ROW = 8192  # numbers per row of channel_rows (k pixels of C channels) at least, where the pixels allow
PIECE = 1 << 18  # numbers per piece of an activation: 1 MB of float32 per operand, which stays in cache


def channel_rows(a):
    """``a`` ``(..., C)`` viewed as ``(R, k*C)``, rows of k whole pixels (k*C about ``ROW``), and k.

    Copies ``a`` only if it is not contiguous."""
    xp = array_module(a)
    a = xp.ascontiguousarray(a)
    c = a.shape[-1]
    pixels = a.size // c
    k = 1
    while k * c < ROW and pixels % (2 * k) == 0:
        k *= 2
    return a.reshape(pixels // k, k * c), k


def tiled(v, k):
    """A per-channel vector ``v`` ``(C,)`` repeated k times, to match ``channel_rows``."""
    out = array_module(v).empty((k, len(v)), dtype=v.dtype)
    out[...] = v  # (a third of the time of xp.tile, which is written in Python)
    return out.reshape(-1)


def column_sums(rows, other=None):
    r"""Sums down the columns of ``rows``: :math:`\sum_r a_{rj}` (a BLAS product with a vector of ones), or with
    ``other`` :math:`\sum_r a_{rj} b_{rj}` (``einsum``); ``(k*C,)`` in the rows' dtype."""
    xp = array_module(rows)
    if other is None:
        return xp.ones(len(rows), dtype=rows.dtype) @ rows
    return xp.einsum("ij,ij->j", rows, other)


def channel_totals(per_column, k):
    """Column sums of ``channel_rows`` ``(k*C,)`` -> per-channel totals ``(C,)``, the k partial sums added in float64."""
    return per_column.reshape(k, -1).sum(axis=0, dtype=array_module(per_column).float64)


def add_up(partial, xp):
    """The sum of per-piece column sums, in float64, added in piece order (the same order on any number of threads)."""
    total = xp.zeros(partial[0].shape, dtype=xp.float64)
    for part in partial:
        total += part
    return total


def pixel_sums(rows, k, other=None):
    r"""Per-channel sums over the pixels of ``rows`` (``channel_rows``): :math:`\sum_p a_{pc}`, or with ``other``
    :math:`\sum_p a_{pc} b_{pc}`; float64 ``(C,)``."""
    return channel_totals(column_sums(rows, other), k)


class BatchNorm2d(Workspace, layers.BatchNorm2d):
    """``layers.BatchNorm2d``, fast: the same formulas on ``channel_rows``, piece by piece; fused kernels on a GPU.

    Keeps x - mean (``xc``) for backward: the variance and the sums backward needs are then sums of
    products of centred numbers, which float32 adds accurately however far the mean lies from zero.

    ``forward(x, activation=leaky)`` also applies a following LeakyReLU, piece by piece while each piece of
    y is in cache, and ``backward`` then takes dL/d(activation's output) and applies its derivative the same
    way (the fast ``Sequential`` does this for every BatchNorm2d followed by a LeakyReLU): the same numbers as
    the two layers one after the other, with two passes over memory fewer in each direction.

    On a GPU (device arrays) it runs fused kernels of ``kernels`` instead, three each way (the same formulas, per
    element in CUDA C, the variance from sums of x and x^2 in float64).
    """

    def forward(self, x, activation=None, overwrite_input=False):
        """``overwrite_input``: x is an output of the layer before, which nothing else reads; on the CPU BatchNorm
        then keeps x - mean in it, instead of in an array of its own (on a GPU it keeps x itself anyway)."""
        self.check_input(x)
        if is_device_array(x):
            return self._forward_gpu(x, activation)
        return self._forward_cpu(x, activation, overwrite_input)

    def backward(self, dy):
        if is_device_array(dy):
            return self._backward_gpu(dy)
        return self._backward_cpu(dy)

    def _forward_cpu(self, x, activation, overwrite_input=False):
        xp, dtype = array_module(x), x.dtype
        rows, k = channel_rows(x)
        m = x.size // x.shape[-1]
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        mean = pixel_sums(rows, k) / m if self.training else rm
        mean_k = tiled(mean.astype(dtype), k)
        own_memory = overwrite_input and x.flags.c_contiguous  # (else rows is a copy, new at every call)
        xc = rows if own_memory else self.work_array("xc", rows.shape, dtype, xp)

        def centre(x_p, xc_p):  # x - mean, and its squares' sums column by column
            xp.subtract(x_p, mean_k, out=xc_p)
            return column_sums(xc_p, xc_p) if self.training else None

        squares = each_piece(centre, rows, xc, size=PIECE)
        if self.training:
            var = channel_totals(add_up(squares, xp), k) / m
            rm += (self.momentum * (mean - rm)).astype(dtype)
            rv += (self.momentum * (var * (m / max(m - 1, 1)) - rv)).astype(dtype)
        else:
            var = rv
        self.m, self.k, self.xc = m, k, xc
        self.inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(dtype)
        y = self.output_array("y", x.shape, dtype, xp)
        scale_k, beta_k = tiled(self.params["gamma"] * self.inv_std, k), tiled(self.params["beta"], k)

        def scale_shift(xc_p, y_p):
            xp.multiply(xc_p, scale_k, out=y_p)
            y_p += beta_k
            if activation is not None:
                activation.apply(y_p, out=y_p, scratch=self._piece_scratch(xc)[:len(y_p)])

        each_piece(scale_shift, xc, y.reshape(rows.shape), size=PIECE)
        self.activation, self.y = activation, y  # backward reads the activation's derivative off y
        return y

    def _piece_scratch(self, rows):
        # room for one piece of intermediate numbers, reused by every piece the calling thread works on
        return self.thread_array("piece", (piece_rows(rows, PIECE),) + rows.shape[1:], rows.dtype, array_module(rows))

    def _backward_cpu(self, dy):
        xp, dtype = array_module(dy), dy.dtype
        m, k, xc, inv_std = self.m, self.k, self.xc, self.inv_std
        dy_rows, _ = channel_rows(dy)
        dx = self.output_array("dx", dy.shape, dtype, xp)
        dx_rows = dx.reshape(dy_rows.shape)
        scale_k = tiled(self.params["gamma"] * inv_std, k)
        # g = dL/d(gamma xhat + beta): dy itself, or with an activation dy times its derivative, written into dx
        act = self.activation
        g_rows = dy_rows if act is None else dx_rows
        y_rows = dy_rows if act is None else self.y.reshape(dy_rows.shape)  # (read only with an activation)

        def sums_of(dy_p, y_p, g_p, xc_p):  # of g and of g (x - mean), column by column
            if act is not None:
                act.times_derivative(dy_p, y_p, out=g_p)
            return column_sums(g_p), column_sums(g_p, xc_p)

        sums = each_piece(sums_of, dy_rows, y_rows, g_rows, xc, size=PIECE)
        sum_g = channel_totals(add_up([s[0] for s in sums], xp), k)
        sum_g_xhat = channel_totals(add_up([s[1] for s in sums], xp), k) * inv_std
        self.grads["gamma"] += sum_g_xhat.astype(dtype)
        self.grads["beta"] += sum_g.astype(dtype)
        if not self.training:
            each_piece(lambda g_p, dx_p: xp.multiply(g_p, scale_k, out=dx_p), g_rows, dx_rows, size=PIECE)
            return dx
        # through the batch mean and variance too:
        # dx = gamma/sigma * (g - mean(g) - xhat * mean(g * xhat)), with xhat = xc / sigma
        xc_scale = tiled((-sum_g_xhat * inv_std / m).astype(dtype), k)
        mean_g = tiled((sum_g / m).astype(dtype), k)

        def input_grad(g_p, xc_p, dx_p):
            xp.subtract(g_p, mean_g, out=dx_p)  # (g may be dx itself)
            dx_p += xp.multiply(xc_p, xc_scale, out=self._piece_scratch(xc)[:len(xc_p)])
            dx_p *= scale_k

        each_piece(input_grad, g_rows, xc, dx_rows, size=PIECE)
        return dx

    def _forward_gpu(self, x, activation):
        xp, dtype, c = array_module(x), x.dtype, x.shape[-1]
        rows = xp.ascontiguousarray(x).reshape(-1, c)
        m = len(rows)
        gamma, rm, rv = self.params["gamma"], self.buffers["running_mean"], self.buffers["running_var"]
        if self.training:
            mean, scale, inv_std = self.work_array("stats", (3, c), dtype, xp)
            sums = kernels.block_sums(xp, "sum_powers", rows, kernels.pair(xp))  # of x and of x^2, per block
            kernels.kernel(xp, "bn_batch_stats")(sums, len(sums), c, gamma, float(m), self.eps, self.momentum,
                                                 m / max(m - 1, 1), mean, scale, inv_std, rm, rv)
        else:
            mean = rm
            inv_std = (1.0 / xp.sqrt(rv + self.eps)).astype(dtype)
            scale = gamma * inv_std
        y = self.output_array("y", x.shape, dtype, xp)
        slope = 1.0 if activation is None else activation.slope
        kernels.kernel(xp, "bn_apply")(rows, mean, scale, self.params["beta"], slope, y.reshape(rows.shape))
        # x itself, not x - mean: backward recomputes the difference where it needs it
        self.m, self.rows, self.mean, self.inv_std, self.activation, self.y = m, rows, mean, inv_std, activation, y
        return y

    def _backward_gpu(self, dy):
        xp, dtype = array_module(dy), dy.dtype
        dy_rows = xp.ascontiguousarray(dy).reshape(self.rows.shape)
        y_rows = self.y.reshape(self.rows.shape)
        slope = 1.0 if self.activation is None else self.activation.slope  # (slope 1: g = dy, whatever y is)
        c = len(self.inv_std)
        scale, mean_g, xc_scale = self.work_array("grad stats", (3, c), dtype, xp)
        sums = kernels.block_sums(xp, "sum_grads_pair", dy_rows, y_rows, slope, self.rows, self.mean, kernels.pair(xp))
        kernels.kernel(xp, "bn_grad_stats")(sums, len(sums), c, self.params["gamma"], self.inv_std,
                                            float(self.m), int(self.training),
                                            self.grads["gamma"], self.grads["beta"], scale, mean_g, xc_scale)
        dx = self.output_array("dx", dy.shape, dtype, xp)
        kernels.kernel(xp, "bn_backward")(dy_rows, y_rows, slope, self.rows, self.mean, mean_g, xc_scale, scale,
                                          dx.reshape(dy_rows.shape))
        return dx


