"""scratchvae: a Variational Autoencoder from scratch, in NumPy (CPU) and CuPy (GPU).

Modules, one idea each: backend (NumPy or CuPy), layers (the reference engine: forward/backward by hand, in
textbook form), vae (the ELBO math and the model), optim (Adam, SGD), gradcheck (finite differences), data
(CelebA, cache, batches), faces (the built-in synthetic faces), train (the loop and checkpoints), plots
(figures); fast (the fast engine, the default for training: the reference layers made fast, tested equal).
"""
__version__ = "0.1.0"
