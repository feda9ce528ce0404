"""The VAE on the fast engine: ``vae.VAE``'s model and formulas, built from the fast layers, with flat parameters."""
from __future__ import annotations

from ..backend import array_module, to_host
from ..vae import VAE, SquaredError
from . import layers, recon
from .optim import Adam
from .workspace import flat_buffers, flat_parameters, flatten_parameters, recycling_outputs, share_scratch


class FastVAE(VAE):
    """``VAE(engine="fast")``: the same model as ``VAE(engine="reference")`` (parameter names, initialisation,
    numbers), built from ``scratchvae.fast``'s layers. Its parameters, gradients and buffers each live in one
    array, so that Adam, ``zero_grad`` and the buffers' snapshot each work on one array; the layers share their
    scratch arrays; inside a training step the layers write their outputs over the previous step's."""

    engine = "fast"
    layers = layers

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(self.recon) is SquaredError:  # the derived term: its sums shared among the threads
            self.recon = recon.SquaredError()
        flatten_parameters(self)
        share_scratch(self)

    def __setstate__(self, state):
        # a copy's (or an unpickled model's) parameters are arrays of their own, no longer views of one: flatten anew
        self.__dict__.update(state)
        self.__dict__.pop("_flat", None)
        flatten_parameters(self)
        share_scratch(self)

    def make_optimizer(self, lr=1e-3):
        """The fast engine's Adam, over the model's one array of parameters."""
        return Adam(self, lr=lr)

    def state_arrays(self):
        """The parameters and the buffers as their two flat arrays, where they have them."""
        flat, flat_b = flat_parameters(self), flat_buffers(self)
        if flat is None or flat_b is None:
            return super().state_arrays()
        return [flat[0], flat_b]

    def zero_grad(self):
        """Every gradient set to zero, all at once where they share one array."""
        flat = flat_parameters(self)
        if flat is None:
            return super().zero_grad()
        flat[1][...] = 0

    def snapshot_buffers(self):
        """A copy of the buffers: one copy of their shared array where they have one."""
        flat_b = flat_buffers(self)
        return super().snapshot_buffers() if flat_b is None else flat_b.copy()

    def restore_buffers(self, snapshot):
        """Put back the buffers' values of ``snapshot_buffers``, in place."""
        if isinstance(snapshot, dict):
            return super().restore_buffers(snapshot)
        flat_buffers(self)[...] = snapshot

    def forward_backward(self, x, eps=None, rng=None):
        """``VAE.forward_backward``, with every layer writing over its outputs of the last call (nothing a layer
        returns outlives the call)."""
        with recycling_outputs(self):
            return super().forward_backward(x, eps=eps, rng=rng)

    def logged_scalars(self, loss, recon, kl):
        """``VAE.logged_scalars``, written into one array instead of stacked (on a GPU, CuPy's stack costs as
        much as the KL)."""
        scalars = array_module(loss).empty(3, dtype=loss.dtype)
        scalars[0] = loss
        recon.mean(keepdims=True, out=scalars[1:2])
        kl.mean(keepdims=True, out=scalars[2:])
        loss, recon, kl = to_host(scalars)
        return {"loss": float(loss), "recon": float(recon), "kl": float(kl)}
