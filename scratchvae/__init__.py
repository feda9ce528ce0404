"""scratchvae: a Variational Autoencoder from scratch, in NumPy (CPU) and CuPy (GPU).

Modules, one idea each: backend (NumPy or CuPy), layers (the reference engine: forward/backward by hand, in
textbook form), vae (the ELBO math and the model), optim (Adam, SGD), gradcheck (finite differences), data
(CelebA, cache, batches), faces (the built-in synthetic faces), train (the loop and checkpoints), plots
(figures); fast (the fast engine, the default for training: the reference layers made fast, tested equal).
"""
import os
import sys

# The fast engine shares elementwise work among threads right after matrix products, while OpenBLAS's idle
# threads would spin on the other cores for about 0.1 s (fast/threads.py): ask them to sleep sooner. OpenBLAS
# reads this once, as NumPy loads it; a value the user set wins.
OPENBLAS_SPIN_SET = "numpy" not in sys.modules or "OPENBLAS_THREAD_TIMEOUT" in os.environ
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
