"""Benchmark of the data module: cache build rate, cache reopening, batch assembly, draft decoding, synthetic faces.

    python benchmarks/bench_data.py                       # the CelebA sample in ../shared/data/celeba
    python benchmarks/bench_data.py --data ~/celeba --workers 1 2 4

Every cache goes to a fresh temporary folder, removed at the end (never beside the data). The JPEG files
are read through the OS page cache, so a second run reads them from memory: the build figures are
decode-bound, which is what they mean to measure.
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scratchvae import backend, data  # noqa: E402
from scratchvae.faces import synthetic_faces  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/celeba"
FULL_CELEBA = 202_599


def _cpu_seconds() -> float:
    """CPU time used so far by this process and its finished children (the cache-build workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_build(path, image_size, workers, limit) -> tuple:
    """Build a cache from scratch with ``workers`` processes; return (wall seconds, CPU seconds, images cached)."""
    with tempfile.TemporaryDirectory(prefix="scratchvae-bench-") as tmp:
        c, t = _cpu_seconds(), time.perf_counter()
        ds = data.load_celeba(path, image_size, cache_dir=tmp, limit=limit, workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - t, _cpu_seconds() - c
        n = len(ds.train) + len(ds.valid) + len(ds.test)
        assert ds.cache_built
    return seconds, cpu, n


def bench_batches(split, batch_size, epochs=2) -> tuple:
    """Mean ms per batch for the gather alone and for a whole yielded batch (gather, device copy, scaling)."""
    batches = data.Batches(split, batch_size, seed=0)
    gather, whole = [], []
    for epoch in range(epochs):
        for idx in batches.indices(epoch):
            t = time.perf_counter()
            split.images[idx]
            gather.append(time.perf_counter() - t)
        it = batches.epoch(epoch)
        while True:
            t = time.perf_counter()
            x = next(it, None)
            if x is None:
                break
            float(x[0, 0, 0, 0])  # on a GPU, wait for the copy and the scaling to finish
            whole.append(time.perf_counter() - t)
    return 1e3 * float(np.mean(gather)), 1e3 * float(np.mean(whole)), len(batches)


def bench_draft(files, image_size) -> dict:
    """Decode ``files`` fully and with JPEG draft mode; rates and how far apart the results are."""
    out = {}
    results = {}
    for draft in (False, True):
        t = time.perf_counter()
        arrs = []
        for f in files:
            with Image.open(f) as im:
                arrs.append(data.preprocess(im, image_size, draft=draft))
        out[f"rate_{draft}"] = len(files) / (time.perf_counter() - t)
        results[draft] = np.stack(arrs).astype(int)
    d = np.abs(results[True] - results[False])
    out.update(mean=d.mean(), within1=(d <= 1).mean(), p99=np.percentile(d, 99), max=d.max())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CelebA folder or zip (default: the shared sample)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to build with")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--draft-images", type=int, default=600, help="images for the draft-mode comparison")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the sample's missing-image warnings are expected here
    backend.get_xp()

    print(f"data: {args.data}   image size {args.image_size}   device {backend.device_name()}")
    print("\n== cache build (decode + crop + bilinear resize + write), fresh cache each time")
    print(f"  (load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; other work slows the wall figures)")
    for w in args.workers:
        seconds, cpu, n = bench_build(args.data, args.image_size, w, args.limit)
        rate = n / seconds
        print(f"  workers={w}: {n:,} images in {seconds:.2f} s = {rate:,.0f} images/s"
              f"   -> full CelebA ({FULL_CELEBA:,}) in ~{FULL_CELEBA / rate / 60:.1f} min"
              f"   [{n / cpu:,.0f} images per CPU-second]")

    with tempfile.TemporaryDirectory(prefix="scratchvae-bench-") as tmp:
        ds = data.load_celeba(args.data, args.image_size, cache_dir=tmp, limit=args.limit,
                              workers=max(args.workers), progress=False)
        t = time.perf_counter()
        again = data.load_celeba(args.data, args.image_size, cache_dir=tmp, limit=args.limit, progress=False)
        reopen = time.perf_counter() - t
        assert not again.cache_built
        print(f"\n== second run: scan + key check + memory map of the built cache: {reopen * 1e3:.0f} ms")
        print(f"  splits: train {len(ds.train):,} / valid {len(ds.valid):,} / test {len(ds.test):,}")

        print("\n== batch assembly from the memory map (shuffled; mean per batch over 2 epochs of train)")
        for b in (64, 128):
            g, whole, n_batches = bench_batches(again.train, b)
            print(f"  batch {b:>3}: gather {g:.3f} ms, gather + to device + scale to [0,1] {whole:.3f} ms"
                  f"  ({b / whole * 1e3:,.0f} images/s; {n_batches} batches/epoch)")
        del ds, again

    files = sorted(Path(args.data).glob("*.jpg"))
    if files and args.draft_images:
        files = files[:: max(1, len(files) // args.draft_images)][: args.draft_images]
        r = bench_draft(files, args.image_size)
        scale = data.draft_scale(args.image_size)
        print(f"\n== JPEG draft mode (1/{scale} scale) vs full decode, {len(files)} images, one process")
        print(f"  full {r['rate_False']:,.0f} images/s, draft {r['rate_True']:,.0f} images/s")
        print(f"  |draft - full|: mean {r['mean']:.2f}, {100 * r['within1']:.1f}% of values within 1 grey level, "
              f"99th percentile {r['p99']:.0f}, max {r['max']}")

    t = time.perf_counter()
    synthetic_faces(4096, args.image_size, seed=0)
    print(f"\n== synthetic faces: {4096 / (time.perf_counter() - t):,.0f} images/s at {args.image_size}px")


if __name__ == "__main__":
    main()
