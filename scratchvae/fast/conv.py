"""The fast engine's convolutions: gathers from strided views and sub-pixel products, on work arrays.

Every convolution here is "gather, then multiply". A gather copies, for every output position, the input numbers
its kernel window covers into one row of a column matrix. In NHWC one row of a window, kw neighbouring pixels, is
kw*C consecutive numbers, so all the windows of an image are ONE strided view of it, and the gather is ONE
contiguous copy out of that view (plus thin strips for the windows that overlap the zero padding): no loop over
kernel offsets, no scatter-add (col2im), no padded copy of the image, and every work array kept from step to step.

==========================  ========================================================================
Conv2d forward              gather x with stride s (im2col), multiply by W
ConvTranspose2d forward     gather x with stride 1 in sub-pixel windows, multiply, interleave the phases
Conv2d backward to x        the transposed convolution of dy (the same code as ConvTranspose2d forward)
ConvTranspose2d backward    the convolution of dy (the same gather as Conv2d forward); it also gives dW
==========================  ========================================================================

A stride-1 Conv2d with fewer outputs than inputs (the decoder's last layer, 32 -> 3 channels) multiplies first
and shifts afterwards, so that its work arrays hold kh*kw*C_out numbers per pixel, not kh*kw*C_in.
Each class subclasses its reference layer (``scratchvae.layers``), keeps its parameters, layouts and
initialisation, and overrides ``forward``/``backward`` only; ``tests/fast/`` checks both give the same numbers.
"""
from __future__ import annotations

from .. import backend, layers
from ..backend import array_module
from . import kernels
from .norm import PIECE, channel_rows, pixel_sums
from .threads import each_piece, get_threads
from .workspace import Workspace

# images per block of the multiply-first convolution: tap planes of about 4 MB, which are still in cache when added
TAP_BLOCK = 1 << 20
# numbers per block of ConvTranspose2d's backward column matrix (8 MB of float32), in cache for both its products
DCOL_BLOCK = 1 << 21
# numbers per block of the sub-pixel column matrix (8 MB), in cache for its products and the interleaving copies
SUBPIXEL_BLOCK = 1 << 21


def images_per_block(n, per_image, size):
    """Images per block, for blocks of about ``size`` numbers at ``per_image`` each: the n images in as few blocks
    as that allows, all of one length but the last, which is shorter by less than the number of blocks."""
    blocks = -(-n * per_image // max(size, per_image))
    return -(-n // blocks)


def shorter_last(start, block, n):
    """Whether the block of images from ``start`` is a last one shorter than the others."""
    return start + block > n


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
    # the strides of C-contiguous memory, from the shape: an axis of length 1 may carry any stride and still
    # count as contiguous (one channel of NCHW memory seen as NHWC), and reading that stride would stray
    sc = xpad.itemsize
    sw, sh, sn = c * sc, wp * c * sc, hp * wp * c * sc
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


def gather(module, name, x, top, left, oh, ow, kh, kw, stride, ones_column=False, scratch=False, last=False):
    """The column matrix ``(N*OH*OW, kh*kw*C)`` of every kernel window of NHWC ``x``, in a work array of ``module``.

    Output position (p, q) sees the window whose top-left pixel is ``(top + s p, left + s q)``; where a window
    reaches outside x (a negative ``top`` is padding) it reads zeros. The windows that lie inside x are one
    copy out of ``windows(x)``; only the thin border strips of windows that do not are gathered out of small
    zero-bordered copies of the few rows or columns they read, so x itself is never copied into a padded array.
    On a GPU one kernel (``kernels``' ``im2col``) writes the whole matrix instead, zeros and ones included.

    With ``scratch`` the matrix is a ``scratch_array``, for a caller who is done with it before it returns. A
    caller that gathers by blocks of images says which is the ``last``, shorter one: its border strips keep
    arrays of their own, so that blocks of two lengths reallocate none.
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
        rows = (module.scratch_array if scratch else module.work_array)(name, (n * oh * ow, one + k), x.dtype, xp)
        kernels.kernel(xp, "im2col")(x, h, w, c, oh, ow, kh, kw, stride, top, left, one, rows)
        return rows
    if scratch:  # shared with other layers: the column of ones is written anew
        col = module.scratch_array(name, (n, oh, ow, one + k), x.dtype, xp)
        col[..., :one] = 1
    else:  # made filled with ones: the windows overwrite all but the first column, which so stays ones for good
        col = module.work_array(name, (n, oh, ow, one + k), x.dtype, xp, fill=one or None, tag=one)
    taps = col[..., one:].reshape(n, oh, ow, kh, kw * c)
    (p0, p1), border_rows = _split(top, stride, kh, h, oh)
    (q0, q1), border_cols = _split(left, stride, kw, w, ow)
    if p0 < p1 and q0 < q1:
        if not x.flags.c_contiguous:  # the images, NCHW memory seen as NHWC: one copy into channels-last
            x = module.padded(name + " x", x, 0, 0, 0, 0)
        def copy_windows(taps_p, x_p):  # a few images' windows: the images shared among the threads
            taps_p[:, p0:p1, q0:q1] = windows(x_p, top + stride * p0, left + stride * q0, p1 - p0, q1 - q0, kh, kw,
                                              stride)

        each_piece(copy_windows, taps, x, size=PIECE)
    # the border strips: whole rows of output positions above and below, then the rest of the columns
    strips = [(rows, (0, ow)) for rows in border_rows] + [((p0, p1), cols) for cols in border_cols if p0 < p1]
    for (pa, pb), (qa, qb) in strips:
        r0, c0 = top + stride * pa, left + stride * qa
        rows, above, below = _inside(r0, top + stride * (pb - 1) + kh, h)
        cols, before, after = _inside(c0, left + stride * (qb - 1) + kw, w)
        part = module.padded(f"{name} border {pa} {qa}" + " last" * last, x[:, rows, cols], above, below, before,
                             after)
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
    n, _, _, cin = x.shape
    cout, kh, kw = w.shape[1:]
    oh, ow = out_hw
    s, one = stride, int(bias is not None)
    taps_h, taps_w = subpixel_taps(kh, s, padding), subpixel_taps(kw, s, padding)
    d0, e0 = min(d for _, _, d in taps_h), min(e for _, _, e in taps_w)
    th, tw = max(d for _, _, d in taps_h) - d0 + 1, max(e for _, _, e in taps_w) - e0 + 1
    mh, mw = -(-oh // s), -(-ow // s)  # output pixels per phase (rounded up; the excess is cropped below)
    # rows (ones, window row t, window column u, c_in) x columns (row phase a, column phase b, c_out): the weights
    # phase (a, b) applies to each number of a window, zero where that phase lacks a tap
    # (kept from call to call: where a phase lacks a tap it stays zero, so only the taps are written anew)
    wsub = module.work_array(name + " wsub", (one + th * tw * cin, s, s, cout), w.dtype, array_module(w), fill=0)
    if bias is not None:
        wsub[0] = bias  # every phase of every pixel
    y = module.output_array(name, (n, mh, s, mw, s, cout), x.dtype, array_module(x))
    if backend.is_device_array(x):
        col = gather(module, "subpixel_col", x, d0, e0, mh, mw, th, tw, 1, bias is not None, scratch=True)
        kernels.kernel(array_module(w), "subpixel_weights")(w, cin, cout, kh, kw, th, tw, s, padding, d0, e0, wsub[one:])
        _phase_products_gpu(module, col, wsub, y)
    else:
        row_phases = [phase_taps(taps_h, a, s, d0) for a in range(s)]
        _subpixel_weights_cpu(w, wsub[one:].reshape(th, tw, cin, s, s, cout), row_phases,
                              [phase_taps(taps_w, b, s, e0) for b in range(s)])
        # a block of images at a time: its column matrix and phase products stay in cache until interleaved
        block = images_per_block(n, mh * mw * len(wsub), SUBPIXEL_BLOCK)
        for start in range(0, n, block):
            col = gather(module, "subpixel_col", x[start:start + block], d0, e0, mh, mw, th, tw, 1, bias is not None,
                         scratch=True, last=shorter_last(start, block, n))
            _phase_products_cpu(module, col, wsub, y[start:start + block], row_phases, tw * cin, one)
    return y.reshape(n, mh * s, mw * s, cout)[:, :oh, :ow, :]


def _subpixel_weights_cpu(w, taps, row_phases, col_phases):
    """The CPU's sub-pixel weights ``taps`` (T, T, C_in, s, s, C_out): one strided copy of W per phase, into an
    array that is zero where a phase lacks a tap; the phases' taps as slices (``phase_taps``)."""
    for a, rows in enumerate(row_phases):
        for b, cols in enumerate(col_phases):  # all the taps of phase (a, b) in one copy
            if rows and cols:
                taps[rows[0], cols[0], :, a, b, :] = w[:, :, rows[1], cols[1]].transpose(2, 3, 0, 1)


def _phase_products_cpu(module, col, wsub, y, row_phases, window_row, one):
    """The CPU's sub-pixel products: for each row phase, the window rows up to its last tap (a leading block of
    col's columns after ``one`` column of ones or none, ``window_row`` = T*C_in numbers a row) times its weights,
    copied into its output pixels."""
    xp = array_module(col)
    n, mh, s, mw, _, cout = y.shape
    phase = module.scratch_array("phase", (len(col), s * cout), col.dtype, xp)
    for a, rows in enumerate(row_phases):
        used = one + (rows[0].stop if rows else 0) * window_row
        xp.matmul(col[:, :used], wsub[:used, a].reshape(used, s * cout), out=phase)

        def interleave(y_p, phase_p, a=a):  # output pixels (s m + a, s m' + b): one copy, shared among the threads
            y_p[:, :, a] = phase_p

        each_piece(interleave, y, phase.reshape(n, mh, mw, s, cout), size=PIECE)


def _phase_products_gpu(module, col, wsub, y):
    """On a GPU, where each product and copy is a launch: every phase in one product (the zero rows included),
    then one copy that interleaves them."""
    n, mh, s, mw, _, cout = y.shape
    phases = module.scratch_array("phases", (len(col), s * s * cout), col.dtype, array_module(col))
    array_module(col).matmul(col, wsub.reshape(len(wsub), s * s * cout), out=phases)
    y[...] = phases.reshape(n, mh, mw, s, s, cout).transpose(0, 1, 3, 2, 4, 5)


def sum_over_rows(a, b):
    """``a^T b`` for a ``(K, m)`` and b ``(K, n)`` with many rows K: a weight gradient, summed over pixels.

    Computed as ``(b^T a)^T`` when m < n: OpenBLAS's threads share a product with fewer rows than columns
    badly when K is large, so the side with more columns goes first.
    """
    return a.T @ b if a.shape[1] >= b.shape[1] else (b.T @ a).T


class Conv2d(Workspace, layers.Conv2d):
    r"""``layers.Conv2d``, fast: im2col by ``gather`` and one matrix product that adds the bias too; the
    gradient to x is the transposed convolution of dy (``transposed_conv``).

    At stride 1 with fewer output than input channels, the product comes first: every input pixel is
    multiplied by all kh*kw taps at once (``(kh*kw*C_out, C_in) @ x^T``), and each output plane adds up the
    tap planes shifted by (i - pad, j - pad). That keeps kh*kw*C_out numbers per pixel instead of kh*kw*C_in
    (27 instead of 288 for the 32 -> 3 layer that ends the decoder), and the shifts move whole image rows.
    Its output is returned as an NHWC view of NCHW memory, the images' own layout.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.multiply_first = self.stride == 1 and self.out_channels < self.in_channels

    def _wmat_with_bias(self):
        # the bias row, then (out, in, kh, kw) -> (kh*kw*in, out): rows ordered like the columns of im2col
        w, one = self.params["W"], int("b" in self.params)
        wmat = self.work_array("wmat", (one + w[0].size, self.out_channels), w.dtype, array_module(w))
        if one:
            wmat[0] = self.params["b"]
        wmat[one:].reshape(self.kh, self.kw, self.in_channels, self.out_channels)[...] = w.transpose(2, 3, 1, 0)
        return wmat

    def forward(self, x):
        oh, ow = self.check_input(x)
        n = x.shape[0]
        self.x_shape, self.out_hw = x.shape, (oh, ow)
        if self.multiply_first:
            return self._forward_multiply_first(x)
        p = self.padding
        self.col = gather(self, "col", x, -p, -p, oh, ow, self.kh, self.kw, self.stride, "b" in self.params)
        xp = array_module(x)
        y = xp.matmul(self.col, self._wmat_with_bias(), out=self.output_array("y", (len(self.col), self.out_channels), x.dtype, xp))
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
        shifts = list(self._shifts())

        def add_taps(planes, z_images):  # a few images: (images, C_out, OH, OW) and (images, kh, kw, C_out, H, W)
            for i, j, (rows, cols), (in_rows, in_cols) in shifts:
                planes[:, :, rows, cols] += z_images[:, i, j][:, :, in_rows, in_cols]

        for start in range(0, n, block):
            # z[i, j, o] is the plane (block, H, W) of every input pixel times tap (i, j) for output channel o
            xp.matmul(taps, self.x2[start * h * w:(start + block) * h * w].T, out=z)
            z_images = z.reshape(self.kh, self.kw, cout, block, h, w).transpose(3, 0, 1, 2, 4, 5)
            each_piece(add_taps, y[start:start + block], z_images, size=self._share(y[start:start + block]))
        return y.transpose(0, 2, 3, 1)  # NHWC in shape, NCHW in memory

    @staticmethod
    def _share(images):
        """Numbers per piece that give each thread an equal run of whole images."""
        return -(-len(images) // get_threads()) * (images.size // len(images))

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
        shifts = list(self._shifts())

        def shift_dy(dz_images, dy_images):  # a few images: (images, kh, kw, C_out, H, W) and (images, C_out, OH, OW)
            for i, j, (rows, cols), (in_rows, in_cols) in shifts:
                dz_images[:, i, j][:, :, in_rows, in_cols] = dy_images[:, :, rows, cols]

        for start in range(0, n, block):
            if backend.is_device_array(dy):  # one block of all N images: every tap's copy in one launch
                kernels.kernel(xp, "tap_planes_of_dy")(dy_planes, n, h, w, cout, *self.out_hw, self.kw, self.padding, dz)
            else:
                dz_images = dz.transpose(3, 0, 1, 2, 4, 5)
                each_piece(shift_dy, dz_images, dy_planes[:, start:start + block].transpose(1, 0, 2, 3),
                           size=self._share(dz_images))
            pixels = slice(start * h * w, (start + block) * h * w)
            dw += sum_over_rows(dz2.T, self.x2[pixels])
            if dx is not None:
                xp.matmul(dz2.T, taps, out=dx[pixels])
        self.grads["W"] += dw.reshape(self.kh, self.kw, cout, c).transpose(2, 3, 0, 1).astype(dy.dtype)
        return None if dx is None else dx.reshape(n, h, w, c)


class ConvTranspose2d(Workspace, layers.ConvTranspose2d):
    """``layers.ConvTranspose2d``, fast: forward is ``transposed_conv`` (sub-pixel phases, no scatter); backward
    is a Conv2d-style gather of dy, whose columns give both dW and dx, a block of images at a time (the partial
    dW added in float64)."""

    def forward(self, x):
        oh, ow = self.check_input(x)
        self.x2, self.in_hw = x.reshape(-1, self.in_channels), x.shape[1:3]
        return transposed_conv(self, x, self.params["W"], self.stride, self.padding, (oh, ow), self.params.get("b"))

    def backward(self, dy):
        xp = array_module(dy)
        n, _, _, cout = dy.shape
        (h, w), p, cin = self.in_hw, self.padding, self.in_channels
        # images per block: the block's column matrix stays in cache for both its products (all N on a device)
        block = n if backend.is_device_array(dy) else images_per_block(n, h * w * self.kh * self.kw * cout, DCOL_BLOCK)
        # (one block, as on a GPU: dW is the block's product itself, with no launch to sum it)
        dw = None if block >= n else xp.zeros((self.kh * self.kw * cout, cin), dtype=xp.float64)
        dx = self.output_array("dx", (n * h * w, cin), dy.dtype, xp) if self.input_grad else None
        wmat_t = self._wmat().T
        for start in range(0, n, block):
            pixels = slice(start * h * w, min(start + block, n) * h * w)
            # the windows of dy that every input pixel scattered onto: im2col of dy with stride s
            dcol = gather(self, "dcol", dy[start:start + block], -p, -p, h, w, self.kh, self.kw, self.stride,
                          scratch=True, last=shorter_last(start, block, n))
            part = sum_over_rows(dcol, self.x2[pixels])  # (kh*kw*out, in)
            if dw is None:
                dw = part
            else:
                dw += part
            if dx is not None:
                xp.matmul(dcol, wmat_t, out=dx[pixels])
        self.grads["W"] += dw.reshape(self.kh, self.kw, cout, cin).transpose(3, 2, 0, 1)
        if "b" in self.params:
            if backend.is_device_array(dy):  # two launches instead of five
                sums = kernels.block_sums(xp, "sum_rows", dy.reshape(-1, cout))
                kernels.kernel(xp, "add_block_sums")(sums, len(sums), cout, self.grads["b"])
            else:
                dy_rows, k = channel_rows(dy)
                self.grads["b"] += pixel_sums(dy_rows, k).astype(dy.dtype)
        return None if dx is None else dx.reshape(n, h, w, cin)
