"""The fast engine's layer set: the names a model is built from, as in ``scratchvae.layers``.

Each fast layer subclasses the reference layer of the same name and keeps its parameters, layouts and
initialisation; the layers with nothing to gain (Linear, Flatten, Reshape) are the reference's own.
"""
from __future__ import annotations

from .. import layers
from ..layers import Flatten, Linear, Module, Reshape  # noqa: F401  (the reference's own serve here too)
from .activations import LeakyReLU, ReLU, Sigmoid, Tanh  # noqa: F401
from .conv import Conv2d, ConvTranspose2d  # noqa: F401
from .norm import BatchNorm2d


class Sequential(layers.Sequential):
    """``layers.Sequential``, where a BatchNorm2d directly followed by a LeakyReLU runs as one step,
    ``BatchNorm2d.forward(x, activation=leaky)``: the same numbers, with the activation applied to each piece
    of BatchNorm's output while it is in cache. Inside a training step a BatchNorm2d right after a convolution
    keeps x - mean in the convolution's output (``overwrite_input``), which nothing else reads."""

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
        before = None
        for layer, activation in self._steps:
            if isinstance(layer, BatchNorm2d):
                # inside a training step a convolution's output is read by the next layer alone (a convolution's
                # backward needs its input, not its output; an activation's would need its output)
                owned = layer.recycle_outputs and isinstance(before, (Conv2d, ConvTranspose2d))
                x = layer.forward(x, activation=activation, overwrite_input=owned)
            else:
                x = layer.forward(x)
            before = layer
        return x

    def backward(self, dy):
        for layer, _ in reversed(self._steps):
            dy = layer.backward(dy)
        return dy
