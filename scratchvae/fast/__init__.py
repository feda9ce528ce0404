"""The fast engine: the reference layers (``scratchvae.layers``) made fast, tested equal to them.

Every trick that buys speed lives here (see ``README.md`` beside this file): work arrays and recycled outputs
(``workspace``), strided gathers and sub-pixel transposed convolutions (``conv``), BatchNorm on long rows in
cache pieces (``norm``), the activations (``activations``), the squared error (``recon``), Adam over one flat
array (``optim``), the threads that share the elementwise work (``threads``), the CUDA kernels of the GPU path
(``kernels``) and the VAE that uses them (``vae.FastVAE``, what ``VAE(engine="fast")`` builds).
``fast.layers`` is the layer set, named as in ``scratchvae.layers``.
"""
from .layers import (BatchNorm2d, Conv2d, ConvTranspose2d, Flatten, LeakyReLU, Linear, ReLU, Reshape,  # noqa: F401
                     Sequential, Sigmoid, Tanh)
from .optim import Adam  # noqa: F401
from .vae import FastVAE  # noqa: F401
