r"""Fused kernels for the GPU path: BatchNorm with its activation in 6 CUDA launches a layer instead of 64,
Adam's update in one instead of 13, and each of the convolutions' gathers, weight rearrangements and shifted
sums in one instead of up to 19.

On a GPU every array operation is at least one kernel launch, and CuPy spends microseconds of Python and driver
time on each, whatever the array's size; for this VAE's small layers that can outweigh the arithmetic
(``benchmarks/count_ops.py`` counts the launches). BatchNorm's formulas written as whole-array operations are
some thirty launches each way, most of them on vectors of C numbers; here each stage is one
user-defined kernel whose body is the formula for one element, in CUDA C (three launches each way).
Each sum over pixels is taken in blocks of rows first (``block_sums``), so that the GPU has thousands of sums to
share out rather than C, and the kernel that uses a sum adds up its blocks' sums itself; two sums over the same
rows come from one launch (``pair``):

=========================  ==========================================================================
``sum_rows``               per-channel sums :math:`\sum_p x_{pc}` (float64)
``sum_powers``             per-channel :math:`\sum_p x_{pc}` and :math:`\sum_p x_{pc}^2` (float64)
``bn_batch_stats``         :math:`\mu`, :math:`1/\sigma`, :math:`\gamma/\sigma`, and the running averages' update,
                           from the blocks' sums: :math:`\sigma^2 = \overline{x^2} - \mu^2`
``bn_apply``               :math:`y = \mathrm{act}(\gamma/\sigma \cdot (x - \mu) + \beta)`, act = LeakyReLU
``sum_grads_pair``         :math:`\sum_p g_{pc}` and :math:`\sum_p g_{pc} (x - \mu)_{pc}`, with g = dL/dy times
                           act's derivative
``bn_grad_stats``          dL/dgamma, dL/dbeta and the per-channel factors of dL/dx, from the blocks' sums
``bn_backward``            :math:`dx = \gamma/\sigma \cdot (g - \bar g - \hat x \, \overline{g \hat x})`
``add_block_sums``         a gradient += the per-channel total of blocks' sums (a transposed conv's bias)
``adam``                   Adam's moments and parameter update (``fast.optim.Adam``), one pass over them
``im2col``                 the column matrix of every kernel window (``conv.gather``), zeros outside x
``subpixel_weights``       W rearranged for the sub-pixel transposed convolution (``conv.transposed_conv``)
``tap_planes_sum``         a multiply-first convolution's output: its bias plus the tap planes, shifted
``tap_planes_of_dy``       the shifted copies of dy that its backward multiplies (``conv.Conv2d``)
=========================  ==========================================================================

The variance comes from the sums of x and of x squared, in one pass, where the NumPy path sums the squares of
x - mean in a second pass (float32 sums need the centring; see ``norm.BatchNorm2d``). Summed in float64, the
one pass's variance is off by a relative :math:`10^{-16} \mu^2 / \sigma^2` or so, and both paths compute
x - mean in the arrays' dtype, each time it is needed, the same way, so BatchNorm keeps no centred copy of x on
the GPU.

The last four move numbers, or add them in the NumPy path's order: they give the NumPy path's arrays exactly,
each element read from where the NumPy path's strided copies take it, by index arithmetic (a ``raw`` input is
read at a computed index).

The activation is LeakyReLU with ``slope`` (ReLU: 0); slope 1 makes it the identity, for a BatchNorm alone.
The NumPy path computes the same numbers with ufuncs, piece by piece in cache; each body repeats its order
of operations and roundings (float64 for sums and per-channel statistics, the arrays' dtype ``T`` for the
rest), compiled with ``--fmad=false`` so that no multiply and add are merged into one rounding: the two
paths differ only by the order in which the sums over pixels add up, and by the variance's one pass. The
tests run these kernels on their stand-in device, compiling the same C with the host's C++ compiler
(``tests/standin_kernels.py``), and compare them with the NumPy path.
"""
from __future__ import annotations

import math

# y = LeakyReLU(v), and g = dy times its derivative read off y (y > 0 exactly where v > 0)
_ACT = "(v > 0 ? v : v * slope)"
_GRAD = "(y > 0 ? dy : dy * slope)"

SPECS = {
    # (a reduction's a and b are the values being folded, so no input takes those names; ``which`` is ``pair``'s
    # 0 or 1, so that one launch gives two sums side by side)
    "sum_rows": ("reduction", "T x", "float64 s", "x", "a + b", "s = a", "0"),
    "sum_powers": ("reduction", "T x, int32 which", "float64 s", "which == 0 ? (double)x : (double)x * x", "a + b",
                   "s = a", "0"),
    "sum_grads_pair": ("reduction", "T dy, T y, T slope, T x, T mean, int32 which", "float64 s",
                       f"which == 0 ? (double)(T){_GRAD} : (double)(T){_GRAD} * (T)(x - mean)", "a + b", "s = a", "0"),
    # (the blocks' sums come as ``block_sums``'s (blocks, 2, C): channel i's first sum of block b at (2 b) C + i, its
    # second at (2 b + 1) C + i)
    "bn_batch_stats": (
        "elementwise", "raw float64 sums, int32 blocks, int32 c, T gamma, float64 m, float64 eps, float64 momentum, "
        "float64 unbias", "T mean, T scale, T inv_std, T running_mean, T running_var",
        """double total = 0, squares = 0;
        for (int b = 0; b < blocks; ++b) {
          total += sums[(2LL * b) * c + i];
          squares += sums[(2LL * b + 1) * c + i];
        }
        const double mu = total / m, mean_square = squares / m - mu * mu;
        const double var = mean_square > 0 ? mean_square : 0;  // (rounding could leave a constant channel below 0)
        running_mean += (T)(momentum * (mu - running_mean));
        running_var += (T)(momentum * (var * unbias - running_var));
        mean = (T)mu;
        inv_std = (T)(1.0 / sqrt(var + eps));
        scale = gamma * inv_std"""),
    "bn_apply": ("elementwise", "T x, T mean, T scale, T beta, T slope", "T y",
                 f"const T xc = x - mean; const T v = xc * scale + beta; y = {_ACT}"),
    "bn_grad_stats": (
        "elementwise", "raw float64 sums, int32 blocks, int32 c, T gamma, T inv_std, float64 m, int32 batch_stats",
        "T dgamma, T dbeta, T scale, T mean_g, T xc_scale",
        """double sum_g = 0, sum_g_xc = 0;
        for (int b = 0; b < blocks; ++b) {
          sum_g += sums[(2LL * b) * c + i];
          sum_g_xc += sums[(2LL * b + 1) * c + i];
        }
        const double sum_g_xhat = sum_g_xc * inv_std;
        dgamma += (T)sum_g_xhat;
        dbeta += (T)sum_g;
        scale = gamma * inv_std;
        mean_g = batch_stats ? (T)(sum_g / m) : (T)0;
        xc_scale = batch_stats ? (T)(-sum_g_xhat * inv_std / m) : (T)0"""),
    "add_block_sums": ("elementwise", "raw float64 sums, int32 blocks, int32 c", "T total",
                       """double s = 0;
                       for (int b = 0; b < blocks; ++b) s += sums[(long long)b * c + i];
                       total += (T)s"""),
    "bn_backward": ("elementwise", "T dy, T y, T slope, T x, T mean, T mean_g, T xc_scale, T scale", "T dx",
                    f"const T g = {_GRAD}; const T xc = x - mean; dx = ((g - mean_g) + xc * xc_scale) * scale"),
    "adam": ("elementwise", "T g, float64 beta1, float64 beta2, float64 step_size, float64 bias2, float64 eps, "
             "float64 weight_decay", "T p, T m, T v",
             """const T grad = weight_decay != 0 ? g + p * (T)weight_decay : g;
             m = m * (T)beta1 + grad * (T)(1 - beta1);
             v = v * (T)beta2 + grad * grad * (T)(1 - beta2);
             p -= m * (T)step_size / (sqrt(v / (T)bias2) + (T)eps)"""),
    # col (N*OH*OW, one + kh*kw*C): row (n, p, q), column (ones, window row ti, window column tj, channel);
    # x (N, H, W, C) in any layout (a raw array is read by its logical index). One division in 64 bits, the rest
    # in 32 (a GPU divides 64-bit integers in software): ``conv.gather`` makes sure the rows number fewer than 2^31
    "im2col": ("elementwise", "raw T x, int32 h, int32 w, int32 c, int32 oh, int32 ow, int32 kh, int32 kw, "
               "int32 stride, int32 top, int32 left, int32 one", "T col",
               """const long long width = one + kh * kw * c, row64 = i / width;
               const int k = (int)(i - row64 * width) - one, row = (int)row64;
               const int q = row % ow, p = row / ow % oh, n = row / (ow * oh);
               if (k < 0) {
                 col = (T)1;
               } else {
                 const int ch = k % c, tj = k / c % kw, ti = k / (c * kw);
                 const int r = top + stride * p + ti, s = left + stride * q + tj;
                 col = (0 <= r && r < h && 0 <= s && s < w) ? x[(((long long)n * h + r) * w + s) * c + ch] : (T)0;
               }"""),
    # wsub (window row t, window column u, C_in, row phase a, column phase b, C_out) holds W[c, o, ti, tj] for the
    # kernel row ti = a + pad - s d that phase a applies at shift d = d0 + t (``conv.subpixel_taps``), and the
    # same along columns; zero where that row or column lies outside the kernel
    "subpixel_weights": ("elementwise", "raw T w, int32 cin, int32 cout, int32 kh, int32 kw, int32 th, int32 tw, "
                         "int32 stride, int32 pad, int32 d0, int32 e0", "T wsub",
                         """const int o = (int)(i % cout), b = (int)(i / cout % stride);
                         const int a = (int)(i / ((long long)cout * stride) % stride);
                         const long long tuc = i / ((long long)cout * stride * stride);
                         const int ch = (int)(tuc % cin), u = (int)(tuc / cin % tw), t = (int)(tuc / ((long long)cin * tw));
                         const int ti = a + pad - stride * (d0 + t), tj = b + pad - stride * (e0 + u);
                         wsub = (0 <= ti && ti < kh && 0 <= tj && tj < kw)
                             ? w[(((long long)ch * cout + o) * kh + ti) * kw + tj] : (T)0"""),
    # y (N, C_out, OH, OW) of a stride-1 convolution = bias + every tap plane z[ti, tj, o] (N, H, W) that reaches it,
    # z[ti, tj, o][n, p + ti - pad, q + tj - pad], added one tap after the other, as the NumPy path does. (This and
    # the next count image planes, N kh kw C_out of them, in 32 bits: 2^31 planes of z would take 8 GB per pixel.)
    "tap_planes_sum": ("elementwise", "raw T z, raw T bias, int32 n, int32 h, int32 w, int32 cout, int32 oh, int32 ow, "
                       "int32 kh, int32 kw, int32 pad", "T y",
                       """const long long plane64 = i / (oh * ow);  // (image, channel): the one 64-bit division
                       const int plane = (int)plane64, pixel = (int)(i - plane64 * (oh * ow));
                       const int q = pixel % ow, p = pixel / ow, o = plane % cout, img = plane / cout;
                       T total = bias[o];
                       for (int ti = 0; ti < kh; ++ti) {
                         const int r = p + ti - pad;
                         for (int tj = 0; tj < kw; ++tj) {
                           const int s = q + tj - pad;
                           if (0 <= r && r < h && 0 <= s && s < w)
                             total += z[((((long long)(ti * kw + tj) * cout + o) * n + img) * h + r) * w + s];
                         }
                       }
                       y = total"""),
    # its backward's dz (kh, kw, C_out, N, H, W): dz[ti, tj, o][n, r, s] = dy[o][n, r - ti + pad, s - tj + pad], the
    # output pixel that tap read input pixel (r, s) for; zero where that lies outside dy (from dy's planes (C_out, N, OH, OW))
    "tap_planes_of_dy": ("elementwise", "raw T dy_planes, int32 n, int32 h, int32 w, int32 cout, int32 oh, int32 ow, "
                         "int32 kw, int32 pad", "T dz",
                         """const long long plane64 = i / (h * w);  // (tap, channel, image): the one 64-bit division
                         const int plane = (int)plane64, pixel = (int)(i - plane64 * (h * w));
                         const int s = pixel % w, r = pixel / w, img = plane % n, o = plane / n % cout, tap = plane / (n * cout);
                         const int p = r - tap / kw + pad, q = s - tap % kw + pad;
                         dz = (0 <= p && p < oh && 0 <= q && q < ow)
                             ? dy_planes[(((long long)o * n + img) * oh + p) * ow + q] : (T)0"""),
}
OPTIONS = ("--fmad=false",)  # NVRTC's: a * b + c rounded twice, as NumPy does, not once (fused multiply-add)

_built = {}


def kernel(xp, name):
    """The kernel ``name`` of ``SPECS``, built (once) with ``xp``'s ``ElementwiseKernel`` or ``ReductionKernel``."""
    key = (xp.ElementwiseKernel, name)
    if key not in _built:
        kind, *spec = SPECS[name]
        if kind == "elementwise":
            _built[key] = xp.ElementwiseKernel(*spec, name=name, options=OPTIONS)
        else:
            # reduce_type is pasted into the CUDA source as it is: a C type, not NumPy's name for it
            _built[key] = xp.ReductionKernel(*spec, name=name, reduce_type="double", options=OPTIONS)
    return _built[key]


def pair(xp):
    """The int32 array ``[0, 1]`` shaped ``(1, 2, 1)``: passed to a reduction that takes ``which``, it broadcasts each
    block of rows to both values, so that the reduction gives two sums per channel in one launch."""
    key = (xp.ElementwiseKernel, "pair")
    if key not in _built:
        _built[key] = xp.arange(2, dtype=xp.int32).reshape(1, 2, 1)
    return _built[key]


def block_sums(xp, name, rows, *args):
    """Per-channel float64 sums of the reduction ``name`` over ``rows`` ``(P, C)``, one for each block of up to 1024
    rows, each block's in its own thread: ``(blocks, k, C)``, k = 2 when ``args`` hold ``pair(xp)``, else 1.
    ``args`` are arrays read row by row like ``rows`` (of its shape), per-channel vectors ``(C,)``, scalars, or
    ``pair``."""
    p, c = rows.shape
    block = math.gcd(p, 1024)
    blocked = [a.reshape(p // block, block, 1, c) if getattr(a, "shape", None) == rows.shape else a
               for a in (rows,) + args]
    return kernel(xp, name)(*blocked, axis=1)
