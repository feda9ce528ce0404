"""How many array operations one training step issues on the GPU code path: each is at least one CuPy kernel launch.

    python benchmarks/count_ops.py                      # default and small presets
    python benchmarks/count_ops.py --presets small --by-line

On a GPU every array operation is a kernel launch, and CuPy spends some microseconds of Python and driver
time on each; for the small layers of this VAE that can outweigh the GPU's arithmetic. The count needs no
GPU: the step runs on the tests' stand-in device (``tests/strict_device.py``: NumPy arrays that take the
code's device branches, as CuPy arrays do), and every ufunc call, NumPy function, assignment into an array,
filled constructor (zeros, ones, full), ``ascontiguousarray``, ``astype`` or ``reshape`` that copies, ``copy``,
and call of a user-defined kernel (``scratchvae.fast.kernels``) or of a fused formula (``backend.fused``) is counted once, attributed to the innermost layer
running, and so is each operand (or output) of a matrix product that CuPy copies first because it is neither
C- nor F-contiguous. It is a lower bound on launches: CuPy runs some operations (einsum, a matrix product's
setup) as several kernels, and allocations are not counted.
The count does not depend on the batch size.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import numpy  # noqa: E402
import standin_kernels  # noqa: E402
import strict_device  # noqa: E402

from scratchvae import layers, vae  # noqa: E402
from scratchvae.optim import Optimizer  # noqa: E402
from scratchvae.vae import VAE  # noqa: E402


class Counter:
    """Counts operations on DeviceArrays while ``active``, keyed by the innermost running layer (or function)."""

    def __init__(self):
        self.active = False
        self.by_owner = collections.Counter()
        self.by_line = collections.Counter()

    def note(self):
        if not self.active:
            return
        frame = sys._getframe(2)
        owner = line = None
        while frame is not None:
            code = frame.f_code
            if line is None and "scratchvae" in code.co_filename.split(os.sep):
                line = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"
            obj = frame.f_locals.get("self")
            if isinstance(obj, layers.Module) and not isinstance(obj, (layers.Sequential, VAE)):
                owner = type(obj).__name__
                break
            if isinstance(obj, Optimizer):
                owner = "Adam"
                break
            frame = frame.f_back
        self.by_owner[owner or "VAE (loss, KL, reparameterization)"] += 1
        self.by_line[line or "?"] += 1


def install(counter):
    """Patch the stand-in's array type and constructors, once, to report to ``counter``."""
    cls = strict_device.DeviceArray

    def counted(method, counts=lambda *args, **kwargs: True):
        def run(*args, **kwargs):
            if counts(*args, **kwargs):
                counter.note()
            return method(*args, **kwargs)
        return run

    cls.__array_ufunc__ = counted(cls.__array_ufunc__)
    # the copies CuPy makes behind an operation: matmul copies an operand that is neither C- nor F-contiguous
    # before calling cuBLAS (and computes into a temporary, then copies, for such an out); reshape copies a
    # view it cannot reshape in place; copy always copies
    matmul_ufunc = cls.__array_ufunc__

    def matmul_copies(self, ufunc, method, *inputs, out=None, **kwargs):
        if ufunc is numpy.matmul:
            for a in (*inputs, *(out or ())):
                if isinstance(a, numpy.ndarray) and not (a.flags.c_contiguous or a.flags.f_contiguous):
                    counter.note()
        return matmul_ufunc(self, ufunc, method, *inputs, out=out, **kwargs)
    cls.__array_ufunc__ = matmul_copies
    cls.copy = counted(cls.copy)
    reshape = cls.reshape

    def reshape_copies(self, *args, **kwargs):
        out = reshape(self, *args, **kwargs)
        if out.size and not numpy.shares_memory(out.view(numpy.ndarray), self.view(numpy.ndarray)):
            counter.note()
        return out
    cls.reshape = reshape_copies
    cls.__array_function__ = counted(cls.__array_function__)
    cls.__setitem__ = counted(cls.__setitem__)
    for kernel_class in (standin_kernels.ElementwiseKernel, standin_kernels.ReductionKernel):  # one launch a call
        kernel_class.__call__ = counted(kernel_class.__call__)
    cls.astype = counted(cls.astype, lambda self, dtype, *args, **kwargs:  # (else no copy)
                         numpy.dtype(dtype) != self.dtype or kwargs.get("copy", True))
    make_module = strict_device.make_strict_module

    def make_counting_module():
        mod = make_module()
        for name in ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like"):
            setattr(mod, name, counted(getattr(mod, name)))
        mod.ascontiguousarray = counted(mod.ascontiguousarray, lambda a, *args, **kwargs: not a.flags.c_contiguous)
        return mod
    strict_device.make_strict_module = make_counting_module
    # a formula that runs as one fused kernel on CuPy (``backend.fused``; the stand-in runs it operation by
    # operation): one launch
    for name, fn in list(vars(vae).items()):
        if hasattr(fn, "formula"):
            def fused_call(*arrays, fn=fn):
                counter.note()
                active, counter.active = counter.active, False
                try:
                    return fn(*arrays)
                finally:
                    counter.active = active
            setattr(vae, name, fused_call)


def count(preset, batch, counter, steps=1, engine="fast"):
    """Operations in one training step of ``preset`` (after two warm-up steps), noted in ``counter``
    (installed with ``install``), which is emptied first."""
    counter.by_owner.clear()
    counter.by_line.clear()
    with strict_device.use_strict_device() as dev:
        model = VAE(image_size=64, preset=preset, engine=engine)
        optimizer = model.make_optimizer(lr=1e-3)
        x = dev.asarray(numpy.random.default_rng(0).random((batch, 3, 64, 64), dtype=numpy.float32))
        for _ in range(2):
            model.train_step(x, optimizer)
        counter.active = True
        for _ in range(steps):
            model.train_step(x, optimizer)
        counter.active = False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["default", "small"])
    p.add_argument("--batch", type=int, default=4, help="images per step (the count does not depend on it)")
    p.add_argument("--by-line", action="store_true", help="also list the source lines that issue the most")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast",
                   help="which engine's step to count (the reference's shows what the fast engine's kernels save)")
    args = p.parse_args(argv)
    counter = Counter()
    install(counter)
    for preset in args.presets:
        count(preset, args.batch, counter, engine=args.engine)
        total = sum(counter.by_owner.values())
        print(f"\n{preset} preset: {total} array operations per training step on the GPU code path")
        print("| where | operations |\n|---|---:|")
        for owner, n in counter.by_owner.most_common():
            print(f"| {owner} | {n} |")
        if args.by_line:
            print("\nsource lines issuing the most:")
            for line, n in counter.by_line.most_common(25):
                print(f"{n:6d}  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
