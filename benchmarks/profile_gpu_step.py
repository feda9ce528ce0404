"""Where the host's time goes in a GPU training step: CuPy's cost per call of each kind of operation, then a
cProfile of ``VAE.train_step`` (default model, batch 128), whose step the GPU finishes as soon as the host has
queued it (``bench_train.py``'s queued/done line): so host time is step time.

    python benchmarks/profile_gpu_step.py [--preset default] [--batch 128] [--steps 20]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from bench_train import time_steps  # noqa: E402


def per_call_us(fn, calls=2000):
    fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def micro(cp):
    """Host microseconds per call of the operations a step is made of (the GPU's work is tiny here)."""
    from scratchvae.fast import kernels  # noqa: PLC0415

    a = cp.ones((128, 128), dtype=cp.float32)
    b = cp.ones((128, 128), dtype=cp.float32)
    c = cp.empty_like(a)
    v = cp.ones(1024, dtype=cp.float32)
    rows = cp.ones((4096, 64), dtype=cp.float32)
    add = cp.ElementwiseKernel("T x, T y", "T z", "z = x + y", "add2")
    def expression(x, y):  # (fuse names its kernel after the function: a lambda's name is no C identifier)
        return x * y + x - y
    fused = cp.fuse(expression)
    tests = {
        "ElementwiseKernel(x, y, out)": lambda: add(v, v, v),
        "ufunc a + b (new output)": lambda: a + b,
        "ufunc cp.add(a, b, out=c)": lambda: cp.add(a, b, out=c),
        "cupy.fuse 3-op call": lambda: fused(a, b),
        "cp.matmul(a, b, out=c)": lambda: cp.matmul(a, b, out=c),
        "cp.dot(a, b, out=c)": lambda: cp.dot(a, b, out=c),
        "a @ b": lambda: a @ b,
        "a.T @ b (transposed operand)": lambda: a.T @ b,
        "ReductionKernel sum_rows (block_sums)": lambda: kernels.block_sums(cp, "sum_rows", rows),
        "a.sum(axis=0)": lambda: a.sum(axis=0),
        "cp.empty((128, 128))": lambda: cp.empty((128, 128), dtype=cp.float32),
        "a.reshape(64, 256)": lambda: a.reshape(64, 256),
        "a.transpose(1, 0)": lambda: a.transpose(1, 0),
        "a[:, :64] (view)": lambda: a[:, :64],
        "a.astype(float32, copy=False)": lambda: a.astype(cp.float32, copy=False),
        "c[...] = a (copy)": lambda: c.__setitem__(Ellipsis, a),
        "cp.cuda.get_current_stream()": lambda: cp.cuda.get_current_stream(),
    }
    cp.cuda.Device().synchronize()
    for name, fn in tests.items():
        try:
            us = per_call_us(fn)
            cp.cuda.Device().synchronize()
            print(f"  {name:42s} {us:7.1f} us per call")
        except Exception as e:  # noqa: BLE001
            print(f"  {name:42s} failed: {e!r}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="default")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    import cupy as cp  # noqa: PLC0415
    import numpy  # noqa: PLC0415

    from scratchvae import backend  # noqa: PLC0415
    from scratchvae.train import NOISE_STREAM  # noqa: PLC0415
    from scratchvae.vae import VAE  # noqa: PLC0415

    xp = backend.set_device("gpu")
    print("== CuPy's host cost per call")
    micro(cp)
    model = VAE(image_size=64, preset=args.preset)
    optimizer = model.make_optimizer(lr=1e-3)
    images = numpy.random.default_rng(0).integers(0, 256, (args.batch, 3, 64, 64), dtype=numpy.uint8)
    x = backend.to_device(images, numpy.float32) / 255
    step_no = [0]

    def step():
        step_no[0] += 1
        model.train_step(x, optimizer, rng=backend.rng((0, NOISE_STREAM, step_no[0])))
    times = time_steps(step, 5, args.steps, xp.cuda.Device().synchronize)
    print(f"\n== {args.preset}, batch {args.batch}: {sum(times) / len(times) * 1e3:.2f} ms per step, the mean of "
          f"{args.steps} (no profiler)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    xp.cuda.Device().synchronize()
    prof.disable()
    for key, count in (("tottime", 45), ("cumulative", 60)):
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats(key).print_stats(count)
        print(f"\n== cProfile over {args.steps} steps, by {key}")
        print(s.getvalue())
    out = os.environ.get("OUT")
    if out:
        prof.dump_stats(os.path.join(out, "step.prof"))


if __name__ == "__main__":
    main()
