"""The same conv VAE in PyTorch, for the comparison in ``bench_train.py`` (PyTorch is not a dependency).

Built layer for layer like ``scratchvae.vae.VAE`` (NCHW shapes, as PyTorch wants; stored NCHW or, with
``memory_format="channels_last"``, NHWC in memory): per encoder width,
Conv2d(3x3, stride 2, pad 1) + BatchNorm + LeakyReLU; two Linear heads for mu and logvar; Linear ->
reshape -> per width ConvTranspose2d(3x3, stride 2, pad 1, output_padding 1) + BatchNorm + LeakyReLU;
a last ConvTranspose2d at the first width, Conv2d(3x3, pad 1) to the image channels, Sigmoid.
The loss is the same: summed squared error plus the KL, averaged over the batch; Adam updates.
"""
from __future__ import annotations

import torch
from torch import nn


class TorchVAE(nn.Module):
    def __init__(self, image_size=64, channels=(32, 64, 128, 256, 512), latent_dim=128, in_channels=3):
        super().__init__()
        enc, c_prev = [], in_channels
        for c in channels:
            enc += [nn.Conv2d(c_prev, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.LeakyReLU(0.01)]
            c_prev = c
        enc.append(nn.Flatten())
        self.encoder = nn.Sequential(*enc)
        self.side = image_size // 2 ** len(channels)
        self.top = channels[-1]
        features = channels[-1] * self.side * self.side
        self.fc_mu = nn.Linear(features, latent_dim)
        self.fc_logvar = nn.Linear(features, latent_dim)
        dec = [nn.Linear(latent_dim, features), nn.Unflatten(1, (channels[-1], self.side, self.side))]
        rev = channels[::-1]
        for c_in, c_out in zip(rev[:-1], rev[1:]):
            dec += [nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
                    nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01)]
        dec += [nn.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=1),
                nn.BatchNorm2d(rev[-1]), nn.LeakyReLU(0.01),
                nn.Conv2d(rev[-1], in_channels, 3, padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def loss(self, x, eps):
        """Mean over the batch of summed squared error + KL(q(z|x) || N(0, I)), with the given noise."""
        h = self.encoder(x)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h).clamp(-30.0, 20.0)
        z = mu + torch.exp(0.5 * logvar) * eps
        out = self.decoder(z)
        sse = ((out - x) ** 2).flatten(1).sum(1)
        kl = 0.5 * (mu * mu + logvar.exp() - logvar - 1).sum(1)
        return (sse + kl).mean()


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def make_train_step(channels, latent_dim, image_size=64, seed=0, memory_format="contiguous", compile=False,
                    device="cpu"):
    """A PyTorch model, its Adam, and ``step(x, eps)``: one forward, backward and update (x, eps torch tensors).

    ``memory_format="channels_last"`` stores the model's 4-d weights channels-last (NHWC in memory); give it
    inputs in that layout too (``to_layout``). ``compile=True`` runs the loss through ``torch.compile``: the
    forward is compiled, its backward follows by AOT autograd, Adam stays eager. Compilation happens in the
    first call (again for a new input shape) and raises there where it does not work (no C++ compiler, no
    triton); ``step.loss`` is the loss function the step calls."""
    torch.manual_seed(seed)
    model = TorchVAE(image_size, tuple(channels), latent_dim).train()
    model.to(device=device, memory_format=MEMORY_FORMATS[memory_format])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.compile(model.loss) if compile else model.loss

    def step(x, eps):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(x, eps)
        loss.backward()
        opt.step()
        return float(loss.detach())

    step.loss = loss_fn
    return model, opt, step


def to_layout(x, memory_format):
    """``x`` stored in ``memory_format`` ("contiguous" or "channels_last"), as the model of that format wants it."""
    return x.contiguous(memory_format=MEMORY_FORMATS[memory_format])
