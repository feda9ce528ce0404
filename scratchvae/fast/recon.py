"""The fast engine's squared error: ``vae.SquaredError``'s sums, a few images at a time, shared among the threads."""
from __future__ import annotations

from .. import vae
from ..backend import array_module
from .norm import PIECE
from .threads import each_piece
from .workspace import Workspace, piece_rows


class SquaredError(Workspace, vae.SquaredError):
    """``vae.SquaredError``, fast: each image's sum of squares over its own row, as NumPy sums a row, so the same
    numbers; the images shared among the threads, their differences in a scratch array of each thread's."""

    def nll(self, x, out):
        xp = array_module(out)
        m, n = out.shape[:2]
        rows = out.reshape(m, n, -1)
        nll = xp.empty((m, n), dtype=out.dtype)

        # one piece's room, of the longest piece's shape: a shorter last piece takes the front of it
        shape = (piece_rows(rows[0], PIECE), rows.shape[2])

        def squares(out_p, x_p, nll_p):
            diff = self.thread_array("diff", shape, out.dtype, xp)[:len(out_p)]
            xp.subtract(out_p, x_p, out=diff)
            diff *= diff
            diff.sum(axis=1, out=nll_p)

        for sample in range(m):
            each_piece(squares, rows[sample], x.reshape(n, -1), nll[sample], size=PIECE)
        return nll

    def nll_backward(self, dnll, x, out):
        xp = array_module(out)
        m, n = out.shape[:2]
        grad = xp.empty(out.shape, dtype=out.dtype)
        scale = 2 * dnll

        def gradient(grad_p, out_p, x_p, scale_p):  # 2 (f(z) - x) dnll
            xp.subtract(out_p, x_p, out=grad_p)
            grad_p *= scale_p[:, None]

        for sample in range(m):
            each_piece(gradient, grad[sample].reshape(n, -1), out[sample].reshape(n, -1), x.reshape(n, -1),
                       scale[sample], size=PIECE)
        return grad
