"""Shared by the layer tests: random inputs, and the convolutions by their definitions, one element at a time."""
import itertools

import numpy

from scratchvae import backend


def randn(xp, *shape, seed=0):
    return backend.rng(seed).standard_normal(shape).astype(numpy.float64)


def naive_conv2d(x, W, b, s, p):
    """Direct definition, one output element at a time (NHWC x, PyTorch-layout W)."""
    n, h, w, c = x.shape
    o, _, kh, kw = W.shape
    xpad = numpy.zeros((n, h + 2 * p, w + 2 * p, c))
    xpad[:, p:p + h, p:p + w] = x
    oh, ow = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    y = numpy.zeros((n, oh, ow, o))
    for ni, yi, xi, oi in itertools.product(range(n), range(oh), range(ow), range(o)):
        patch = xpad[ni, yi * s:yi * s + kh, xi * s:xi * s + kw, :]  # (kh, kw, c)
        y[ni, yi, xi, oi] = b[oi] + numpy.sum(patch * W[oi].transpose(1, 2, 0))
    return y


def naive_conv_transpose2d(x, W, b, s, p, op):
    """Direct definition: each input pixel scatters W-weighted copies onto the (cropped) output."""
    n, h, w, c = x.shape
    _, o, kh, kw = W.shape
    oh, ow = (h - 1) * s - 2 * p + kh + op, (w - 1) * s - 2 * p + kw + op
    y = numpy.zeros((n, oh + 2 * p + kh, ow + 2 * p + kw, o))
    for ni, yi, xi, i, j in itertools.product(range(n), range(h), range(w), range(kh), range(kw)):
        y[ni, yi * s + i, xi * s + j, :] += x[ni, yi, xi, :] @ W[:, :, i, j]
    return y[:, p:p + oh, p:p + ow, :] + b
