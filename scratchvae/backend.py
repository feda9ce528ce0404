"""The array module every computation goes through: NumPy on the CPU, CuPy on a GPU.

Compute code never names ``numpy`` or ``cupy``. It asks for ``xp``:

* ``get_xp()``            the module of the current device (for creating new arrays);
* ``array_module(*arrs)`` the module that owns some arrays (for computing on them).

Deriving ``xp`` from the arrays being computed on is what keeps host and device arrays from mixing:
an operation on CuPy arrays can only produce CuPy arrays. This is the only module that imports CuPy.

The device is chosen once, on first use: ``SCRATCHVAE_DEVICE=cpu|gpu|auto`` (default ``auto``: CuPy when
it imports and sees a GPU, NumPy otherwise), or explicitly with ``set_device``.
"""
from __future__ import annotations

import functools
import os

import numpy

DEVICES = ("auto", "cpu", "gpu")
ENV_VAR = "SCRATCHVAE_DEVICE"

_state = {"xp": None, "dtype": numpy.float32}


def _import_cupy():
    """Return the cupy module if it imports and sees at least one usable GPU, else None."""
    try:
        import cupy  # noqa: PLC0415  (the one place cupy is imported)

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        cupy.zeros(1).sum()  # a driver or toolkit mismatch only shows up when a kernel runs
        return cupy
    except Exception:  # ImportError, CUDARuntimeError, a missing libnvrtc...
        return None


def gpu_available() -> bool:
    """True when CuPy imports and can run a kernel on a GPU."""
    return _import_cupy() is not None


def set_device(device: str = "auto"):
    """Choose the array module: 'cpu' (NumPy), 'gpu' (CuPy) or 'auto'; returns it.

    Asking for 'gpu' where CuPy or a GPU is missing raises a RuntimeError that says what to install.
    """
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        _state["xp"] = numpy
    else:
        cupy = _import_cupy()
        if cupy is None and device == "gpu":
            raise RuntimeError(
                "device 'gpu' was asked for, but CuPy is not installed or sees no usable GPU. "
                "Install the CuPy matching your CUDA (e.g. `pip install .[gpu]` for CUDA 12), "
                f"or use --device cpu / {ENV_VAR}=cpu."
            )
        _state["xp"] = cupy if cupy is not None else numpy
    return _state["xp"]


def get_xp():
    """The array module of the current device (chosen from $SCRATCHVAE_DEVICE on first call)."""
    if _state["xp"] is None:
        set_device(os.environ.get(ENV_VAR, "auto"))
    return _state["xp"]


def device_name() -> str:
    """'gpu' when computing with CuPy, 'cpu' with NumPy."""
    return "cpu" if get_xp() is numpy else "gpu"


# Array types, besides CuPy's, that count as device arrays. The tests register a strict NumPy subclass
# here that refuses to mix with host arrays, so that CuPy's rules are enforced on machines without a GPU.
EXTRA_DEVICE_TYPES = []


def _is_cupy_array(a) -> bool:
    # by the type's module, so that no check imports CuPy
    return type(a).__module__.split(".")[0] == "cupy"


def is_device_array(a) -> bool:
    """True for an array that lives on the device (a CuPy array)."""
    return _is_cupy_array(a) or isinstance(a, tuple(EXTRA_DEVICE_TYPES))


def array_module(*arrays):
    """The module owning ``arrays``: the device module if any is a device array, numpy otherwise."""
    for a in arrays:
        if is_device_array(a):
            if _is_cupy_array(a):
                import cupy  # noqa: PLC0415  (already imported, since a cupy array exists)

                return cupy
            return get_xp()
    return numpy


def fused(formula):
    """``formula`` (a function of arrays made of elementwise operations) run as one kernel on CuPy arrays
    (``cupy.fuse``, compiled on first use), and as it is written on NumPy arrays.

    On a GPU each operation is a kernel launch whose cost to the host does not shrink with the array: for the
    VAE's small per-latent formulas, one launch instead of six is most of the saving."""
    compiled = []

    @functools.wraps(formula)
    def run(*arrays):
        if any(_is_cupy_array(a) for a in arrays):
            if not compiled:
                compiled.append(_import_cupy().fuse(formula))
            return compiled[0](*arrays)
        return formula(*arrays)
    run.formula = formula  # (for benchmarks/count_ops.py, which counts a fused call as one launch)
    return run


def as_strided(a, shape, strides):
    """A view of ``a`` with the given shape and byte strides (no copy), on ``a``'s own device; read-only on NumPy
    (CuPy has no such flag, so there it is read-only by convention).

    The fast engine's convolutions use it to see every kernel window of an image at once; windows overlap, so the
    view must only be read. (CuPy's ``as_strided`` takes no ``subok``; NumPy's needs it to keep subclasses.)
    """
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy  # noqa: PLC0415  (already imported, since a cupy array exists)

        return cupy.lib.stride_tricks.as_strided(a, shape, strides)
    return numpy.lib.stride_tricks.as_strided(a, shape, strides, subok=True, writeable=False)


def to_device(a, dtype=None):
    """Copy a host array (or pass a device one) onto the current device, optionally casting."""
    xp = get_xp()
    out = xp.asarray(a)
    return out if dtype is None else out.astype(dtype, copy=False)


def device_free_memory():
    """Bytes of memory free on the current GPU (CUDA's count plus what CuPy's pool holds unused); None on the CPU."""
    xp = get_xp()
    if xp is numpy or not hasattr(xp, "cuda"):
        return None
    free, _total = xp.cuda.runtime.memGetInfo()
    return free + xp.get_default_memory_pool().free_bytes()


def to_host(a) -> numpy.ndarray:
    """A NumPy copy of a NumPy or CuPy array (for logging, plotting and saving only)."""
    if is_device_array(a):
        return a.get()
    return numpy.asarray(a)


def to_float(a) -> float:
    """A 0-d array as a Python float (a host transfer: for logged scalars only)."""
    return float(to_host(a))


def seed_to_int(seed) -> int:
    """Fold an int or a tuple of ints (e.g. (seed, step)) into one 63-bit seed."""
    return int(numpy.random.SeedSequence(seed).generate_state(2, numpy.uint64)[0] >> numpy.uint64(1))


def rng(seed):
    """A random Generator on the current device, seeded by an int or a tuple of ints.

    Seeding from a tuple such as ``(seed, step)`` gives every step its own stream, so a resumed run
    draws exactly the noise the uninterrupted run drew, with no generator state to save. (CuPy's generators
    keep 32 bits of the seed: on a GPU two steps share their noise with even odds after some 77,000 steps.)
    """
    xp = get_xp()
    if xp is numpy:
        return numpy.random.default_rng(seed_to_int(seed))
    # cuRAND's Philox, not CuPy's default XORWOW: a generator is seeded every step, and XORWOW's set-up skips every
    # GPU thread ahead to its own subsequence (milliseconds), where Philox's is a counter
    return xp.random.Generator(xp.random.Philox4x3210(seed_to_int(seed)))


def get_default_dtype():
    """The floating dtype new parameters and batches get: float32, or float64 for gradient checks."""
    return _state["dtype"]


def set_default_dtype(dtype) -> None:
    """Set the floating dtype new parameters and batches get (numpy.float32 or numpy.float64)."""
    dtype = numpy.dtype(dtype)
    if dtype not in (numpy.float32, numpy.float64):
        raise ValueError(f"default dtype must be float32 or float64, got {dtype}")
    _state["dtype"] = dtype.type


class default_dtype:
    """Context manager: ``with default_dtype(numpy.float64): ...`` builds float64 models for checks."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.saved = get_default_dtype()
        set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        set_default_dtype(self.saved)


def save_npz(path, arrays) -> None:
    """Write a dict of arrays (device or host) to ``path`` as .npz, atomically: a temporary file, then a rename.

    An interrupted write leaves the previous file intact, never a half-written one.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            numpy.savez(f, **{k: to_host(v) for k, v in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_npz(path) -> dict:
    """Read an .npz written by ``save_npz`` into a dict of host arrays (pickles refused).

    Every entry is read (and its CRC checked) here, so a damaged file fails now, not later; a file that is not
    an .npz at all raises ValueError saying so (rather than NumPy's words about pickles)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        raise ValueError(f"{path} is not an .npz archive ({'empty' if not magic else 'it starts with ' + repr(magic)})")
    with numpy.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
