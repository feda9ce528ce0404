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

Speed without a second, slow path: convolutions gather kernel windows through one strided view and
multiply once (no scatter-adds); elementwise layers write into existing arrays, apply per-channel
vectors to long rows (``channel_rows``) and work through large activations piece by piece, in cache
(``backend.pieces``); scratch arrays live from step to step (``Module.work_array``),
and inside a training step layers overwrite their previous outputs (``Module.recycling_outputs``). On a GPU,
BatchNorm runs as a few fused kernels (``kernels``). See ``benchmarks/README.md`` for figures.

Nothing here imports NumPy: every array op goes through ``xp``, the module owning the arrays
(NumPy or CuPy, see ``backend``).
"""
from __future__ import annotations

import contextlib
import math

from . import backend, kernels
from .backend import array_module, piece_rows, pieces


def memory_order(a):
    """The axes of ``a`` from the one with the largest stride to the smallest: the order its numbers lie in memory."""
    return sorted(range(a.ndim), key=lambda axis: -a.strides[axis])


def _inverse(order):
    return [order.index(axis) for axis in range(len(order))]


class Module:
    """Base class: parameters, their gradients, buffers, train/eval mode and state dicts."""

    def __init__(self):
        self.params = {}    # name -> array, updated by the optimiser
        self.grads = {}     # name -> array of the same shape, filled by backward
        self.buffers = {}   # name -> array that is state but not trained (BatchNorm running stats)
        self.training = True
        self.input_grad = True  # False: backward skips dL/dx and returns None (a first layer, fed data)
        self.recycle_outputs = False  # True inside a training step: see output_array
        self._work = {}     # name -> (signature, array): scratch arrays reused from step to step
        self._flat = None   # (params, grads, buffers) of flatten_parameters

    # -- the protocol -------------------------------------------------------------------------
    def forward(self, x):
        """Compute the output for input ``x`` and cache what backward needs."""
        raise NotImplementedError

    def backward(self, dy):
        """Given dL/dy, return dL/dx and add dL/dparam into ``self.grads``.

        Layers with weights skip dL/dx, and return None, when ``input_grad`` is False: the first layer of
        a network needs no gradient for the images, and for a convolution it is a costly product.
        """
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # -- work arrays -----------------------------------------------------------------------------
    def work_array(self, name, shape, dtype, xp, fill=None, tag=None):
        """A scratch array kept from call to call instead of being allocated anew every step.

        Allocated (filled with the number ``fill``, if given) on first use and whenever ``shape``, ``dtype``,
        device or ``tag`` change; otherwise handed back exactly as the last call left it. Used for arrays that stay
        inside the layer (padded inputs, gathered windows), and for outputs only through ``output_array``,
        i.e. inside a training step, where no output outlives the step.
        """
        signature = (tuple(shape), xp.dtype(dtype), xp, tag)
        entry = self._work.get(name)
        if entry is None or entry[0] != signature:
            entry = (signature, xp.empty(shape, dtype=dtype) if fill is None else xp.full(shape, fill, dtype=dtype))
            self._work[name] = entry
        return entry[1]

    def output_array(self, name, shape, dtype, xp):
        """The array to write an output into: a new one, or inside a training step the one of the last step.

        Inside a training step (``recycling_outputs``) nothing a layer returns outlives the step, so each
        output overwrites the same array as in the previous step: no fresh memory, whose first touch costs
        the kernel a page fault per 4 KiB (some 4 ms for a 33 MB activation), is needed.
        """
        if self.recycle_outputs:
            return self.work_array("output " + name, shape, dtype, xp)
        return xp.empty(shape, dtype=dtype)

    def output_like(self, name, x):
        """``output_array`` for an output of x's shape and dtype, laid out in memory like x (see ``memory_order``),
        so that elementwise operations read and write both in the same order."""
        xp = array_module(x)
        if not self.recycle_outputs:
            return xp.empty_like(x)
        order = memory_order(x)
        out = self.output_array(name, tuple(x.shape[i] for i in order), x.dtype, xp)
        return out.transpose(_inverse(order))

    @contextlib.contextmanager
    def recycling_outputs(self):
        """Within the block, every layer below writes its outputs over those of its previous call
        (``output_array``). Only for code whose results are all used up before the next call."""
        modules = [m for _, m in self.named_modules()]
        saved = [m.recycle_outputs for m in modules]
        for m in modules:
            m.recycle_outputs = True
        try:
            yield self
        finally:
            for m, flag in zip(modules, saved):
                m.recycle_outputs = flag

    def padded(self, name, x, top, bottom, left, right):
        """NHWC ``x`` copied into the middle of a work array with zero borders of the given widths.

        The borders are zeroed once, when the array is made; later calls with the same geometry
        overwrite only the middle, so padding costs one copy of x and no fill.
        """
        n, h, w, c = x.shape
        shape = (n, top + h + bottom, left + w + right, c)
        out = self.work_array(name, shape, x.dtype, array_module(x), fill=0, tag=(top, left, h, w))
        inside = out[:, top:top + h, left:left + w, :]
        if c > 1 and x.strides[3] > x.strides[2]:
            # x is held as channel planes (images, NCHW): copied plane by plane, the copies run along whole
            # rows instead of C numbers at a time (five times faster for 3 channels)
            for channel in range(c):
                inside[..., channel] = x[..., channel]
        else:
            inside[...] = x
        return out

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
        flat = self.flat_parameters()
        if flat is not None:
            flat[1][...] = 0  # all of them at once
            return
        for _, _, g in self.named_parameters():
            g[...] = 0

    def flatten_parameters(self):
        """Move every parameter below this module into one contiguous array, every gradient into another, and
        every buffer into a third; each module's ``params``, ``grads`` and ``buffers`` then hold views of them
        (values kept). Returns self.

        An optimiser then updates all the parameters with a few whole-array operations (see
        ``flat_parameters``), and ``snapshot_buffers`` copies the buffers in one: on a GPU a few kernels in all,
        instead of a few for each of dozens of arrays.
        """
        if self.flat_parameters() is not None:
            return self  # already done: moving them again would strand an optimiser holding the old arrays
        named = list(self.named_parameters())
        modules = [id(m) for _, m in self.named_modules()]
        if not named or len({p.dtype for _, p, _ in named}) > 1 or len(set(modules)) < len(modules):
            return self  # nothing to do, dtypes that cannot share an array, or a module shared by two parents
        xp, dtype = array_module(named[0][1]), named[0][1].dtype
        total = sum(int(p.size) for _, p, _ in named)
        flat_p, flat_g = xp.empty(total, dtype=dtype), xp.empty(total, dtype=dtype)
        buffers = list(self.named_buffers())
        same_dtype = all(b.dtype == dtype for _, b in buffers)
        flat_b = xp.empty(sum(int(b.size) for _, b in buffers), dtype=dtype) if same_dtype else None
        offset = offset_b = 0
        for _, mod in self.named_modules():
            for name, p in mod.params.items():
                size, g = int(p.size), mod.grads[name]
                flat_p[offset:offset + size] = p.reshape(-1)
                flat_g[offset:offset + size] = g.reshape(-1)
                mod.params[name] = flat_p[offset:offset + size].reshape(p.shape)
                mod.grads[name] = flat_g[offset:offset + size].reshape(g.shape)
                offset += size
            for name, b in mod.buffers.items() if same_dtype else ():
                size = int(b.size)
                flat_b[offset_b:offset_b + size] = b.reshape(-1)
                mod.buffers[name] = flat_b[offset_b:offset_b + size].reshape(b.shape)
                offset_b += size
        self._flat = (flat_p, flat_g, flat_b)
        return self

    def flat_parameters(self):
        """``(params, grads)``, the two arrays of ``flatten_parameters``, in the order of ``named_parameters``,
        while every parameter and gradient is still a view of them (a deep copy, for one, gives each its
        own memory); otherwise None."""
        if self._flat is None:
            return None
        flat_p, flat_g, _ = self._flat
        if all(p.base is flat_p and g.base is flat_g for _, p, g in self.named_parameters()):
            return flat_p, flat_g
        return None

    def _flat_buffers(self):
        # the buffers' one array of flatten_parameters, while every buffer is still a view of it; else None
        flat_b = None if self._flat is None else self._flat[2]
        if flat_b is not None and all(b.base is flat_b for _, b in self.named_buffers()):
            return flat_b
        return None

    def snapshot_buffers(self):
        """A copy of every buffer below this module (BatchNorm's running statistics), for ``restore_buffers``:
        one copy of their shared array where ``flatten_parameters`` made one, else one copy per buffer."""
        flat_b = self._flat_buffers()
        if flat_b is not None:
            return flat_b.copy()
        return {name: b.copy() for name, b in self.named_buffers()}

    def restore_buffers(self, snapshot):
        """Put back the buffers' values of ``snapshot_buffers``, in place."""
        if isinstance(snapshot, dict):
            for name, b in self.named_buffers():
                b[...] = snapshot[name]
        else:
            self._flat_buffers()[...] = snapshot

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
        return dy @ self.params["W"] if self.input_grad else None


# ---- convolution: gathers from strided views, then one matrix product --------------------------------
#
# Every convolution below is "gather, then multiply". A gather copies, for every output position, the
# input numbers its kernel window covers into one row of a column matrix. In NHWC one row of a window,
# kw neighbouring pixels, is kw*C consecutive numbers, so all the windows of an image are ONE strided view
# of it, and the gather is ONE contiguous copy out of that view (plus thin strips for the windows that
# overlap the zero padding): no loop over kernel offsets, no scatter-add (col2im) anywhere, no padded copy
# of the image, and every work array is kept from step to step.
#
#   Conv2d forward            gather x with stride s (im2col), multiply by W
#   ConvTranspose2d forward   gather x with stride 1 in sub-pixel windows, multiply, interleave the phases
#   Conv2d backward to x      the transposed convolution of dy (the same code as ConvTranspose2d forward)
#   ConvTranspose2d backward  the convolution of dy (the same gather as Conv2d forward); it also gives dW
#
# A stride-1 Conv2d with fewer outputs than inputs (the decoder's last layer, 32 -> 3 channels) multiplies
# first and shifts afterwards, so that its work arrays hold kh*kw*C_out numbers per pixel, not kh*kw*C_in.

# Numbers of tap planes per block of images in the multiply-first convolution: 4 MB, 8 of the decoder's
# 64x64 images (27 planes each). Measured in training steps: blocks of 4 images lost to the smaller
# products, blocks of 16 gained less than 8; 8 took the last conv from 30.1 to 24.9 ms per step (small, batch 64).
TAP_BLOCK = 1 << 20


def conv_output_size(size, k, stride, padding):
    """Output length of a convolution along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - k) // stride + 1


def windows(xpad, top, left, oh, ow, kh, kw, stride):
    """Every kernel window of an NHWC array as one strided view ``(N, OH, OW, kh, kw*C)``, without copying.

    Output position (p, q) sees the kh x kw window whose top-left pixel is ``(top + s p, left + s q)``; row i
    of that window is ``xpad[n, top + s p + i, left + s q : left + s q + kw, :]``, kw*C consecutive numbers.
    Windows overlap (neighbours share pixels), so the view is read-only: copy it into a column matrix, whose
    ``(N*OH*OW, kh*kw*C)`` reshape multiplies a ``(kh*kw*C, C_out)`` weight matrix to give the convolution.
    """
    n, hp, wp, c = xpad.shape
    if top + stride * (oh - 1) + kh > hp or left + stride * (ow - 1) + kw > wp or not xpad.flags.c_contiguous:
        raise ValueError(f"windows {kh}x{kw} at stride {stride} do not fit a padded array of shape {xpad.shape}")
    sn, sh, sw, sc = xpad.strides
    return backend.as_strided(xpad[:, top:, left:, :], (n, oh, ow, kh, kw * c), (sn, stride * sh, stride * sw, sh, sc))


def _inside(start, end, size):
    """The part of [start, end) that lies inside [0, size), as a slice, and the widths of it before and after."""
    lo, hi = min(max(start, 0), size), max(min(end, size), 0)
    if hi <= lo:
        return slice(0, 0), end - start, 0
    return slice(lo, hi), lo - start, end - hi


def _split(first, stride, k, size, count):
    """Window starts ``first + stride * p`` for p in [0, count): the range [p0, p1) of windows that lie inside
    [0, size), and the border ranges before and after it (empty ranges left out)."""
    p0 = min(max(-(first // stride) if first < 0 else 0, 0), count)  # first p with first + s p >= 0
    p1 = min(max((size - k - first) // stride + 1, p0), count)       # last p with first + s p + k <= size, plus one
    return (p0, p1), [r for r in ((0, p0), (p1, count)) if r[0] < r[1]]


def gather(module, name, x, top, left, oh, ow, kh, kw, stride, ones_column=False):
    """The column matrix ``(N*OH*OW, kh*kw*C)`` of every kernel window of NHWC ``x``, in a work array of ``module``.

    Output position (p, q) sees the window whose top-left pixel is ``(top + s p, left + s q)``; where a window
    reaches outside x (a negative ``top`` is padding) it reads zeros. The windows that lie inside x are one
    copy out of ``windows(x)``; only the thin border strips of windows that do not are gathered out of small
    zero-bordered copies of the few rows or columns they read, so x itself is never copied into a padded array.
    On a GPU one kernel (``kernels``' ``im2col``) writes the whole matrix instead, zeros and ones included.

    With ``ones_column`` the matrix has a first column of ones. Multiplied by a weight matrix whose first
    row is the bias, the product then adds the bias itself, with no pass of its own over the output; and
    in backward, col^T dy has the bias gradient (the sum of dy) as its first row.
    """
    xp = array_module(x)
    n, h, w, c = x.shape
    k, one = kh * kw * c, int(ones_column)
    if backend.is_device_array(x):
        # on a GPU, where every copy costs a kernel launch, whatever its size: one launch, reading x in place
        if n * oh * ow >= 2 ** 31:  # (im2col counts its rows in 32-bit integers)
            raise ValueError(f"{n * oh * ow} output pixels in one batch: the GPU's im2col takes fewer than 2^31; "
                             "use a smaller batch")
        rows = module.work_array(name, (n * oh * ow, one + k), x.dtype, xp)
        kernels.kernel(xp, "im2col")(x, h, w, c, oh, ow, kh, kw, stride, top, left, one, rows)
        return rows
    # made filled with ones: the windows overwrite all but the first column, which so stays ones for good
    col = module.work_array(name, (n, oh, ow, one + k), x.dtype, xp, fill=one or None, tag=one)
    taps = col[..., one:].reshape(n, oh, ow, kh, kw * c)
    (p0, p1), border_rows = _split(top, stride, kh, h, oh)
    (q0, q1), border_cols = _split(left, stride, kw, w, ow)
    if p0 < p1 and q0 < q1:
        if not x.flags.c_contiguous:  # the images, NCHW memory seen as NHWC: one copy into channels-last
            x = module.padded(name + " x", x, 0, 0, 0, 0)
        taps[:, p0:p1, q0:q1] = windows(x, top + stride * p0, left + stride * q0, p1 - p0, q1 - q0, kh, kw, stride)
    # the border strips: whole rows of output positions above and below, then the rest of the columns
    strips = [(rows, (0, ow)) for rows in border_rows] + [((p0, p1), cols) for cols in border_cols if p0 < p1]
    for (pa, pb), (qa, qb) in strips:
        r0, c0 = top + stride * pa, left + stride * qa
        rows, above, below = _inside(r0, top + stride * (pb - 1) + kh, h)
        cols, before, after = _inside(c0, left + stride * (qb - 1) + kw, w)
        part = module.padded(f"{name} border {pa} {qa}", x[:, rows, cols], above, below, before, after)
        taps[:, pa:pb, qa:qb] = windows(part, 0, 0, pb - pa, qb - qa, kh, kw, stride)
    return col.reshape(n * oh * ow, one + k)


def subpixel_taps(k, s, p):
    """Where each kernel tap of a transposed convolution lands, along one axis: ``[(i, a, d)]`` for i in 0..k-1.

    Input pixel h sends ``x[h] W[i]`` to output ``s h + i - p``. Writing the output as ``o = s m + a``
    (phase a in 0..s-1), that is ``h = m + d`` with ``i = a + p - s d``: within one phase the transposed
    convolution is an ordinary stride-1 one, over the shifts d. Each tap has exactly one phase and one shift.
    """
    return [(i, (i - p) % s, ((i - p) % s + p - i) // s) for i in range(k)]


def phase_taps(taps, phase, stride, first_shift):
    """The taps of one phase among ``subpixel_taps`` as two matching slices, or None if it has none: the window
    rows ``d - first_shift`` they fall on (consecutive shifts d) and the kernel rows i they use (i = a + p - s d,
    so i runs down in steps of s as d runs up)."""
    mine = sorted((d, i) for i, a, d in taps if a == phase)
    if not mine:
        return None
    (d_first, i_first), (d_last, i_last) = mine[0], mine[-1]
    return (slice(d_first - first_shift, d_last - first_shift + 1),
            slice(i_first, i_last - 1 if i_last > 0 else None, -stride))


def transposed_conv(module, x, w, stride, padding, out_hw, bias=None, name="y"):
    r"""The transposed convolution of NHWC ``x`` by ``w (C_in, C_out, kh, kw)``, cropped to ``out_hw``.

    :math:`y[n, s h + i - p, s w' + j - p, o] \mathrel{+}= \sum_c x[n, h, w', c]\, W[c, o, i, j]`, computed in
    sub-pixel form: split the output into its s*s phases ``(o mod s)`` along each axis; each phase is a
    stride-1 convolution of x over a few shifts d (``subpixel_taps``). So gather the T x T window of shifts
    around every input pixel once, and for each output row phase multiply the window rows it uses by W
    rearranged as ``(rows*T*C_in, s*C_out)`` (a column block per column phase, zero where that phase lacks
    a tap; the bias rides on a column of ones); then interleave the phase images. For 3x3 kernels at
    stride 2, T = 2 and the products do 4/3 of the minimum arithmetic, in well-shaped matrix products and
    with no scatter-add. On a GPU, where launches cost more than arithmetic, one product takes every window
    row for all the phases at once (twice the minimum arithmetic), and one copy interleaves them.
    ``module`` lends its work arrays (and ``name``\ s its output array).
    """
    xp = array_module(x)
    n, _, _, cin = x.shape
    cout, kh, kw = w.shape[1:]
    oh, ow = out_hw
    s, one = stride, int(bias is not None)
    taps_h, taps_w = subpixel_taps(kh, s, padding), subpixel_taps(kw, s, padding)
    d0, e0 = min(d for _, _, d in taps_h), min(e for _, _, e in taps_w)
    th, tw = max(d for _, _, d in taps_h) - d0 + 1, max(e for _, _, e in taps_w) - e0 + 1
    mh, mw = -(-oh // s), -(-ow // s)  # output pixels per phase (rounded up; the excess is cropped below)
    col = gather(module, "subpixel_col", x, d0, e0, mh, mw, th, tw, 1, bias is not None)

    # rows (ones, window row t, window column u, c_in) x columns (row phase a, column phase b, c_out): the weights
    # phase (a, b) applies to each number of a window, zero where that phase lacks a tap
    wsub = xp.empty((one + th * tw * cin, s, s, cout), dtype=w.dtype)
    on_device = backend.is_device_array(w)
    if on_device:  # on a GPU: one launch instead of s*s + 1 (``kernels``' subpixel_weights)
        kernels.kernel(xp, "subpixel_weights")(w, cin, cout, kh, kw, th, tw, s, padding, d0, e0, wsub[one:])
    else:  # (the phases' taps as slices serve the copies here and the products below)
        row_phases = [phase_taps(taps_h, a, s, d0) for a in range(s)]
        col_phases = [phase_taps(taps_w, b, s, e0) for b in range(s)]
        wsub[one:] = 0
        taps = wsub[one:].reshape(th, tw, cin, s, s, cout)
        for a, rows in enumerate(row_phases):
            for b, cols in enumerate(col_phases):  # all the taps of phase (a, b) in one copy
                if rows and cols:
                    taps[rows[0], cols[0], :, a, b, :] = w[:, :, rows[1], cols[1]].transpose(2, 3, 0, 1)
    if bias is not None:
        wsub[0] = bias  # every phase of every pixel

    shape = (n, mh, s, mw, s, cout)
    y = module.output_array(name, shape, col.dtype, xp)
    if on_device:
        # on a GPU, where each product and copy is a launch: every phase in one product (the zero rows included),
        # then one copy that interleaves them
        phases = module.work_array(name + " phases", (len(col), s * s * cout), col.dtype, xp)
        xp.matmul(col, wsub.reshape(len(wsub), s * s * cout), out=phases)
        y[...] = phases.reshape(n, mh, mw, s, s, cout).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(n, mh * s, mw * s, cout)[:, :oh, :ow, :]
    phase = module.work_array(name + " phase", (len(col), s * cout), col.dtype, xp)
    for a, rows in enumerate(row_phases):
        # row phase a needs the window rows up to its last tap only: a leading block of col's columns
        used = one + (rows[0].stop if rows else 0) * tw * cin
        xp.matmul(col[:, :used], wsub[:used, a].reshape(used, s * cout), out=phase)
        y[:, :, a] = phase.reshape(n, mh, mw, s, cout)  # output pixels (s m + a, s m' + b): one copy
    return y.reshape(n, mh * s, mw * s, cout)[:, :oh, :ow, :]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def sum_over_rows(a, b):
    """``a^T b`` for a ``(K, m)`` and b ``(K, n)`` with many rows K: a weight gradient, summed over pixels.

    Computed as ``(b^T a)^T`` when m < n: two OpenBLAS threads share a product with fewer rows than
    columns badly when K is large (a 27 x 32 product over 65536 rows ran 200 times slower than its
    transpose on two busy cores), so the side with more columns goes first.
    """
    return a.T @ b if a.shape[1] >= b.shape[1] else (b.T @ a).T


class Conv2d(Module):
    r"""2-D convolution (cross-correlation, as in PyTorch) on NHWC input.

    :math:`y[n, p, q, o] = b_o + \sum_{i, j, c} W[o, c, i, j]\, x_{pad}[n, s p + i, s q + j, c]`.
    x ``(N, H, W, C_in)`` -> y ``(N, OH, OW, C_out)``, OH = floor((H + 2 pad - kh) / s) + 1.
    Computed as im2col (``gather``) followed by one matrix product, which adds the bias too; the gradient
    to x is the transposed convolution of dy (``transposed_conv``). Initialised like PyTorch (fan_in = C_in*kh*kw).

    At stride 1 with fewer output than input channels, the product comes first: every input pixel is
    multiplied by all kh*kw taps at once (``(kh*kw*C_out, C_in) @ x^T``), and each output plane adds up the
    tap planes shifted by (i - pad, j - pad). That keeps kh*kw*C_out numbers per pixel instead of kh*kw*C_in
    (27 instead of 288 for the 32 -> 3 layer that ends the decoder), and the shifts move whole image rows.
    Its output is returned as an NHWC view of NCHW memory, the images' own layout.
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
        self.multiply_first = stride == 1 and out_channels < in_channels

    def _wmat(self):
        # the bias row, then (out, in, kh, kw) -> (kh*kw*in, out): rows ordered like the columns of im2col
        w, one = self.params["W"], int("b" in self.params)
        wmat = self.work_array("wmat", (one + w[0].size, self.out_channels), w.dtype, array_module(w))
        if one:
            wmat[0] = self.params["b"]
        wmat[one:].reshape(self.kh, self.kw, self.in_channels, self.out_channels)[...] = w.transpose(2, 3, 1, 0)
        return wmat

    def forward(self, x):
        n, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expects {self.in_channels} input channels (NHWC), got shape {x.shape}")
        oh = conv_output_size(h, self.kh, self.stride, self.padding)
        ow = conv_output_size(w, self.kw, self.stride, self.padding)
        self.x_shape, self.out_hw = x.shape, (oh, ow)
        if self.multiply_first:
            return self._forward_multiply_first(x)
        p = self.padding
        self.col = gather(self, "col", x, -p, -p, oh, ow, self.kh, self.kw, self.stride, "b" in self.params)
        xp = array_module(x)
        y = xp.matmul(self.col, self._wmat(), out=self.output_array("y", (len(self.col), self.out_channels), x.dtype, xp))
        return y.reshape(n, oh, ow, self.out_channels)

    def backward(self, dy):
        if self.multiply_first:
            return self._backward_multiply_first(dy)
        n, h, w, c = self.x_shape
        # dW = col^T dy, reshaped back to PyTorch's (out, in, kh, kw); its first row, from the ones column, is db
        dw = sum_over_rows(self.col, dy.reshape(-1, self.out_channels))
        one = int("b" in self.params)
        self.grads["W"] += dw[one:].reshape(self.kh, self.kw, c, self.out_channels).transpose(3, 2, 0, 1)
        if one:
            self.grads["b"] += dw[0]
        if not self.input_grad:
            return None
        # dx: every output pixel sends dy W back over its window, i.e. the transposed convolution of dy
        # (Conv2d's W (out, in, kh, kw) is read as a transposed convolution's (in, out, kh, kw))
        return transposed_conv(self, dy, self.params["W"], self.stride, self.padding, (h, w), name="dx")

    # -- stride 1, few output channels: multiply, then shift ---------------------------------------------
    def _shifts(self):
        """For each tap (i, j): the output rows/columns it reaches and the input rows/columns it reads there.

        Output (p, q) reads input (p + i - pad, q + j - pad); only pairs where both lie inside their image count.
        """
        (_, h, w, _), (oh, ow), pad = self.x_shape, self.out_hw, self.padding
        for i in range(self.kh):
            for j in range(self.kw):
                p0, p1 = max(0, pad - i), min(oh, h + pad - i)
                q0, q1 = max(0, pad - j), min(ow, w + pad - j)
                if p0 < p1 and q0 < q1:
                    yield (i, j, (slice(p0, p1), slice(q0, q1)),
                           (slice(p0 + i - pad, p1 + i - pad), slice(q0 + j - pad, q1 + j - pad)))

    def _taps_by_input(self):
        # (out, in, kh, kw) -> (kh*kw*out, in): one row per tap and output channel
        return self.params["W"].transpose(2, 3, 0, 1).reshape(-1, self.in_channels)

    def _block(self, x):
        """Images per block of the multiply-first products: blocks whose tap planes (kh*kw*C_out numbers per
        pixel) fill about ``TAP_BLOCK`` numbers, so that they are added up while still in cache; a divisor of N,
        so that every block has the same shape and one work array serves them all. All N on a device."""
        n, h, w, _ = x.shape
        if backend.is_device_array(x):
            return n
        size = max(1, min(n, TAP_BLOCK // (self.kh * self.kw * self.out_channels * h * w)))
        while n % size:
            size -= 1
        return size

    def _forward_multiply_first(self, x):
        xp = array_module(x)
        n, h, w, c = x.shape
        (oh, ow), cout = self.out_hw, self.out_channels
        self.x2 = x.reshape(-1, c)
        # the output is held as image planes, NCHW, where every shift moves whole rows (and which is the
        # layout the images, and so the loss, have)
        y = self.output_array("y", (n, cout, oh, ow), x.dtype, xp)
        taps, block = self._taps_by_input(), self._block(x)
        z = self.work_array("z", (self.kh * self.kw * cout, block * h * w), x.dtype, xp)
        if backend.is_device_array(x):  # one block of all N images; the bias and every shifted add in one launch
            xp.matmul(taps, self.x2.T, out=z)
            bias = self.params["b"] if "b" in self.params else xp.zeros(cout, dtype=x.dtype)
            kernels.kernel(xp, "tap_planes_sum")(z, bias, n, h, w, cout, oh, ow, self.kh, self.kw, self.padding, y)
            return y.transpose(0, 2, 3, 1)
        y[...] = self.params["b"][None, :, None, None] if "b" in self.params else 0
        z6 = z.reshape(self.kh, self.kw, cout, block, h, w)
        for start in range(0, n, block):
            # z[i, j, o] is the plane (block, H, W) of every input pixel times tap (i, j) for output channel o
            xp.matmul(taps, self.x2[start * h * w:(start + block) * h * w].T, out=z)
            planes = y[start:start + block].transpose(1, 0, 2, 3)  # (C_out, block, OH, OW), like z[i, j]
            for i, j, (rows, cols), (in_rows, in_cols) in self._shifts():
                planes[:, :, rows, cols] += z6[i, j][:, :, in_rows, in_cols]
        return y.transpose(0, 2, 3, 1)  # NHWC in shape, NCHW in memory

    def _backward_multiply_first(self, dy):
        xp = array_module(dy)
        n, h, w, c = self.x_shape
        cout = self.out_channels
        dy_planes = dy.transpose(3, 0, 1, 2)  # (C_out, N, OH, OW): whole rows when dy came back as image planes
        if "b" in self.params:
            self.grads["b"] += dy_planes.sum(axis=(2, 3)).sum(axis=1)  # image planes first: no copy of dy
        taps, block = self._taps_by_input(), self._block(dy)
        # dz[i, j, o] = dy[o] shifted back to the input pixels tap (i, j) read; zero where it read padding.
        # The same pixels are written for every block, so the zeros of the first call stay.
        dz = self.work_array("dz", (self.kh, self.kw, cout, block, h, w), dy.dtype, xp, fill=0)
        dz2 = dz.reshape(-1, block * h * w)
        dw = xp.zeros((len(dz2), c), dtype=xp.float64 if block < n else dy.dtype)  # (kh*kw*out, in)
        dx = self.output_array("dx", (n * h * w, c), dy.dtype, xp) if self.input_grad else None
        for start in range(0, n, block):
            if backend.is_device_array(dy):  # one block of all N images: every tap's copy in one launch
                kernels.kernel(xp, "tap_planes_of_dy")(dy_planes, n, h, w, cout, *self.out_hw, self.kw, self.padding, dz)
            else:
                for i, j, (rows, cols), (in_rows, in_cols) in self._shifts():
                    dz[i, j][:, :, in_rows, in_cols] = dy_planes[:, start:start + block, rows, cols]
            pixels = slice(start * h * w, (start + block) * h * w)
            dw += sum_over_rows(dz2.T, self.x2[pixels])
            if dx is not None:
                xp.matmul(dz2.T, taps, out=dx[pixels])
        self.grads["W"] += dw.reshape(self.kh, self.kw, cout, c).transpose(2, 3, 0, 1).astype(dy.dtype)
        return None if dx is None else dx.reshape(n, h, w, c)


class ConvTranspose2d(Module):
    r"""Transposed convolution on NHWC input: the adjoint of Conv2d (its forward is Conv2d's backward to x).

    Every input pixel scatters ``x[n, h, w, :] @ W[:, :, i, j]`` onto output pixel ``(s h + i - pad, s w + j - pad)``.
    x ``(N, H, W, C_in)`` -> y ``(N, OH, OW, C_out)``, OH = (H - 1) s - 2 pad + kh + output_padding.
    W has PyTorch's layout ``(C_in, C_out, kh, kw)``; initialised like PyTorch (fan_in = C_out*kh*kw).
    Forward is ``transposed_conv`` (sub-pixel phases, no scatter); backward is a Conv2d-style gather of dy,
    whose columns give both dW and dx.
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
        self.x2, self.in_hw = x.reshape(-1, c), (h, w)
        return transposed_conv(self, x, self.params["W"], s, p, (oh, ow), self.params.get("b"), name="y")

    def backward(self, dy):
        xp = array_module(dy)
        n, _, _, cout = dy.shape
        (h, w), p = self.in_hw, self.padding
        # the windows of dy that every input pixel scattered onto: im2col of dy with stride s
        dcol = gather(self, "dcol", dy, -p, -p, h, w, self.kh, self.kw, self.stride)
        dw = sum_over_rows(dcol, self.x2)  # (kh*kw*out, in)
        self.grads["W"] += dw.reshape(self.kh, self.kw, cout, self.in_channels).transpose(3, 2, 0, 1)
        if "b" in self.params:
            if backend.is_device_array(dy):  # two launches instead of five
                sums = kernels.block_sums(xp, "sum_rows", dy.reshape(-1, cout))
                kernels.kernel(xp, "add_block_sums")(sums, len(sums), cout, self.grads["b"])
            else:
                dy_rows, k = channel_rows(dy)
                self.grads["b"] += pixel_sums(dy_rows, k).astype(dy.dtype)
        if not self.input_grad:
            return None
        dx = self.output_array("dx", (n * h * w, self.in_channels), dy.dtype, xp)
        return xp.matmul(dcol, self._wmat().T, out=dx).reshape(n, h, w, self.in_channels)


# ---- per-channel and elementwise arithmetic ---------------------------------------------------------------
#
# BatchNorm and the activations are a handful of whole-array operations each. Four habits keep them near
# the speed of memory: every operation writes into an array that already exists (``out=``, ``+=``), so no
# temporary is allocated and page-faulted in; a per-channel vector is applied to long rows of k*C numbers
# (k pixels side by side, the vector tiled k times, ``channel_rows``), because NumPy's inner loop restarts
# at every row of a broadcast: over rows of only C = 16 or 32 numbers it runs two to three times slower,
# and over rows of 1024 numbers (one 4 KB page) a third of the memory layouts tried ran the operation four
# to five times slower (an aliasing effect of the cache; rows of 8192 numbers showed none, see ``ROW``);
# plain sums over pixels are matrix-vector products with a vector of ones (one BLAS pass, on every
# core), their k partial sums per channel added in float64; and the operations that follow each other
# over one activation run piece by piece (``backend.pieces``, ``PIECE``), so that an activation larger
# than the cache is read from main memory once, not once per operation. On the GPU each call is one
# CuPy kernel over the whole array.

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


def pixel_sums(rows, k, other=None):
    r"""Per-channel sums over the pixels of ``rows`` (``channel_rows``): :math:`\sum_p a_{pc}`, or with ``other``
    :math:`\sum_p a_{pc} b_{pc}`; float64 ``(C,)``."""
    return channel_totals(column_sums(rows, other), k)


class BatchNorm2d(Module):
    r"""Batch normalisation over every axis but the last (channels): NHWC images or ``(N, C)`` vectors.

    Train mode: :math:`\hat x = (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon}`, :math:`y = \gamma \hat x + \beta`,
    with the batch mean and (biased) variance, and running estimates updated with ``momentum``
    (the running variance uses the unbiased batch variance, as PyTorch does). Eval mode uses the
    running estimates, so y is an affine function of x.

    Keeps x - mean (``xc``) for backward: the variance and the sums backward needs are then sums of
    products of centred numbers, which float32 adds accurately however far the mean lies from zero.

    ``forward(x, activation=leaky)`` also applies a following LeakyReLU, piece by piece while each piece of
    y is in cache, and ``backward`` then takes dL/d(activation's output) and applies its derivative the same
    way (``Sequential`` does this for every BatchNorm2d followed by a LeakyReLU): the same numbers as the two
    layers one after the other, with two passes over memory fewer in each direction.

    On a GPU (device arrays) it instead runs fused kernels of ``kernels``, three each way (the same formulas, per
    element in CUDA C, the variance from sums of x and x^2 in float64), since there every array operation costs a
    kernel launch.
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

    def forward(self, x, activation=None):
        if backend.is_device_array(x):
            return self._forward_fused(x, activation)
        xp, dtype = array_module(x), x.dtype
        rows, k = channel_rows(x)
        m = x.size // x.shape[-1]
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        mean = pixel_sums(rows, k) / m if self.training else rm
        mean_k = tiled(mean.astype(dtype), k)
        xc = self.work_array("xc", rows.shape, dtype, xp)
        squares = xp.zeros(rows.shape[1], dtype=xp.float64)  # sum of (x - mean)^2, column by column
        for x_p, xc_p in pieces(rows, xc, size=PIECE):
            xp.subtract(x_p, mean_k, out=xc_p)
            if self.training:
                squares += column_sums(xc_p, xc_p)
        if self.training:
            var = channel_totals(squares, k) / m
            rm += (self.momentum * (mean - rm)).astype(dtype)
            rv += (self.momentum * (var * (m / max(m - 1, 1)) - rv)).astype(dtype)
        else:
            var = rv
        self.m, self.k, self.xc = m, k, xc
        self.inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(dtype)
        y = self.output_array("y", x.shape, dtype, xp)
        scale_k, beta_k = tiled(self.params["gamma"] * self.inv_std, k), tiled(self.params["beta"], k)
        scratch = self._piece_scratch(xc) if activation is not None else None
        for xc_p, y_p in pieces(xc, y.reshape(rows.shape), size=PIECE):
            xp.multiply(xc_p, scale_k, out=y_p)
            y_p += beta_k
            if activation is not None:
                activation.apply(y_p, out=y_p, scratch=scratch[:len(y_p)])
        self.activation, self.y = activation, y  # backward reads the activation's derivative off y
        return y

    def _piece_scratch(self, rows):
        # room for one piece of intermediate numbers, reused by every piece
        return self.work_array("piece", (piece_rows(rows, PIECE),) + rows.shape[1:], rows.dtype, array_module(rows))

    def backward(self, dy):
        if backend.is_device_array(dy):
            return self._backward_fused(dy)
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
        sums = xp.zeros((2, dy_rows.shape[1]), dtype=xp.float64)  # of g and of g (x - mean), column by column
        for dy_p, y_p, g_p, xc_p in pieces(dy_rows, y_rows, g_rows, xc, size=PIECE):
            if act is not None:
                act.times_derivative(dy_p, y_p, out=g_p)
            sums[0] += column_sums(g_p)
            sums[1] += column_sums(g_p, xc_p)
        sum_g, sum_g_xhat = channel_totals(sums[0], k), channel_totals(sums[1], k) * inv_std
        self.grads["gamma"] += sum_g_xhat.astype(dtype)
        self.grads["beta"] += sum_g.astype(dtype)
        if not self.training:
            xp.multiply(g_rows, scale_k, out=dx_rows)
            return dx
        # through the batch mean and variance too:
        # dx = gamma/sigma * (g - mean(g) - xhat * mean(g * xhat)), with xhat = xc / sigma
        xc_scale = tiled((-sum_g_xhat * inv_std / m).astype(dtype), k)
        mean_g = tiled((sum_g / m).astype(dtype), k)
        scratch = self._piece_scratch(xc)
        for g_p, xc_p, dx_p in pieces(g_rows, xc, dx_rows, size=PIECE):
            xp.subtract(g_p, mean_g, out=dx_p)  # (g may be dx itself)
            xc_term = xp.multiply(xc_p, xc_scale, out=scratch[:len(xc_p)])
            dx_p += xc_term
            dx_p *= scale_k
        return dx

    # ---- the GPU path: the formulas above as fused kernels (see ``kernels``) ----

    def _forward_fused(self, x, activation):
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

    def _backward_fused(self, dy):
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


class LeakyReLU(Module):
    """y = x for x > 0, slope * x otherwise (PyTorch's default slope 0.01); for 0 <= slope <= 1 that is max(x, slope x)."""

    def __init__(self, slope=0.01):
        super().__init__()
        if not 0 <= slope <= 1:
            raise ValueError(f"LeakyReLU's slope must lie in [0, 1], got {slope}")
        self.slope = slope

    def forward(self, x):
        y = self.output_like("y", x)
        for x_p, y_p in pieces(x, y, size=PIECE):
            self.apply(x_p, out=y_p)
        self.y = y  # y > 0 exactly where x > 0, so backward needs only y
        return y

    def backward(self, dy):
        dx = self.output_like("dx", dy)
        for dy_p, y_p, dx_p in pieces(dy, self.y, dx, size=PIECE):
            self.times_derivative(dy_p, y_p, out=dx_p)
        return dx

    def apply(self, x, out, scratch=None):
        """``out = max(x, slope x)``; ``out`` may be x itself, and then ``scratch`` (x's shape) holds slope x."""
        xp = array_module(x)
        slope_x = xp.multiply(x, self.slope, out=out if scratch is None else scratch)
        return xp.maximum(x, slope_x, out=out)

    def times_derivative(self, dy, y, out):
        """``out = dy * dy/dx``, the derivative read off the output y: 1 where y > 0, slope elsewhere."""
        xp = array_module(dy)
        # (y > 0) as 1.0 or 0.0, clipped to [slope, 1]: NumPy's sign, and maximum with a scalar,
        # are not vectorised; comparison and clip are
        xp.greater(y, 0, out=out)
        xp.clip(out, self.slope, 1, out=out)
        out *= dy
        return out


class ReLU(LeakyReLU):
    """y = max(x, 0)."""

    def __init__(self):
        super().__init__(slope=0.0)


def sigmoid(x, out=None):
    """The logistic function 1 / (1 + exp(-x)), into ``out`` if given.

    -x is clipped to [-80, 80] first, so that exp cannot overflow float32 (e^80 < 3.4e38) and no output
    is subnormal; that changes only outputs below 1/(1 + e^80), about 2e-35: exact in absolute terms.
    (NumPy's float32 exp takes half the time of its tanh, the other way to write it: (1 + tanh(x / 2)) / 2.)
    """
    xp = array_module(x)
    y = xp.negative(x, out=out)
    xp.clip(y, -80, 80, out=y)
    xp.exp(y, out=y)
    y += 1
    return xp.reciprocal(y, out=y)


class Sigmoid(Module):
    """y = sigmoid(x); dy/dx = y (1 - y)."""

    def forward(self, x):
        self.y = sigmoid(x, out=self.output_like("y", x))
        return self.y

    def backward(self, dy):
        xp = array_module(dy)
        dx = xp.subtract(1, self.y, out=self.output_like("dx", dy))
        dx *= self.y
        dx *= dy
        return dx


class Tanh(Module):
    """y = tanh(x); dy/dx = 1 - y^2."""

    def forward(self, x):
        self.y = array_module(x).tanh(x, out=self.output_like("y", x))
        return self.y

    def backward(self, dy):
        xp = array_module(dy)
        dx = xp.multiply(self.y, self.y, out=self.output_like("dx", dy))
        xp.subtract(1, dx, out=dx)
        dx *= dy
        return dx


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
    """Layers applied in order; backward runs them in reverse (the chain rule).

    A BatchNorm2d followed by a LeakyReLU runs as one step, ``BatchNorm2d.forward(x, activation=leaky)``:
    the same numbers, with the activation applied to each piece of BatchNorm's output while it is in cache.
    """

    def __init__(self, *layers):
        super().__init__()
        self.layers = list(layers)

    def children(self):
        return self.layers

    def steps(self):
        """``[(layer, activation or None)]``: the layers in order, each LeakyReLU after a BatchNorm2d joined to it."""
        steps = []
        for layer in self.layers:
            if isinstance(layer, LeakyReLU) and steps and isinstance(steps[-1][0], BatchNorm2d) and steps[-1][1] is None:
                steps[-1] = (steps[-1][0], layer)
            else:
                steps.append((layer, None))
        return steps

    def forward(self, x):
        self._steps = self.steps()  # backward retraces these
        for layer, activation in self._steps:
            x = layer.forward(x) if activation is None else layer.forward(x, activation=activation)
        return x

    def backward(self, dy):
        for layer, _ in reversed(self._steps):
            dy = layer.backward(dy)
        return dy

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)
