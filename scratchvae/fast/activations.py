"""The fast engine's activations: the reference's formulas written into recycled arrays, piece by piece in cache."""
from __future__ import annotations

from .. import layers
from ..backend import array_module
from .norm import PIECE
from .threads import each_piece
from .workspace import Workspace


class LeakyReLU(Workspace, layers.LeakyReLU):
    """``layers.LeakyReLU``, fast: max(x, slope x) into recycled arrays, piece by piece; backward reads the
    derivative off y (y > 0 exactly where x > 0). ``apply`` and ``times_derivative`` also serve BatchNorm2d."""

    def forward(self, x):
        y = self.output_like("y", x)
        each_piece(lambda x_p, y_p: self.apply(x_p, out=y_p), x, y, size=PIECE)
        self.y = y  # y > 0 exactly where x > 0, so backward needs only y
        return y

    def backward(self, dy):
        dx = self.output_like("dx", dy)
        each_piece(lambda dy_p, y_p, dx_p: self.times_derivative(dy_p, y_p, out=dx_p), dy, self.y, dx, size=PIECE)
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
    """``layers.ReLU``, fast: y = max(x, 0)."""

    def __init__(self):
        super().__init__(slope=0.0)


def sigmoid_into(x, out):
    """``layers.sigmoid`` computed into ``out``, one operation after the other in place: the same numbers."""
    xp = array_module(x)
    y = xp.negative(x, out=out)
    xp.clip(y, -80, 80, out=y)
    xp.exp(y, out=y)
    y += 1
    return xp.reciprocal(y, out=y)


class Sigmoid(Workspace, layers.Sigmoid):
    """``layers.Sigmoid``, fast: into recycled arrays, laid out like its input, piece by piece."""

    def forward(self, x):
        self.y = self.output_like("y", x)
        each_piece(sigmoid_into, x, self.y, size=PIECE)
        return self.y

    def backward(self, dy):
        dx = self.output_like("dx", dy)
        each_piece(sigmoid_backward, dy, self.y, dx, size=PIECE)
        return dx


def sigmoid_backward(dy, y, out):
    """``out = dy * y (1 - y)``, the Sigmoid's derivative read off its output y."""
    xp = array_module(dy)
    xp.subtract(1, y, out=out)
    out *= y
    out *= dy
    return out


class Tanh(Workspace, layers.Tanh):
    """``layers.Tanh``, fast: into recycled arrays, laid out like its input."""

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
