"""Is a change faster? The training step of this working tree against a git revision, in one process.

    python benchmarks/compare_revisions.py HEAD~1                    # small preset, batch 64, 30 steps each
    python benchmarks/compare_revisions.py main --preset default --batch 64 --steps 20

On a shared machine the speed of a process drifts by 15-20% from minute to minute, and from one process
to the next, which hides changes of a few percent when each version runs in its own process. So both
versions run in the same process, on the same batch, their steps interleaved (A B B A A B ...): both
meet the same disturbances. It prints the median step of each, the median of the per-pair ratios with
its quartiles, and a per-layer forward/backward table with the difference. The revision's ``scratchvae``
package is exported with ``git archive`` into a temporary directory and imported under another name
(the package uses relative imports only). Both versions train on the same batch with the same fixed noise.

On a GPU (``--device gpu``) each step ends with a synchronisation, the two versions warm up in turn for
``bench_train.GPU_WARMUP_S`` seconds first, and no per-layer table is made (a synchronisation around every layer
would time its launches, not the step). A lent GPU machine gets a copy of the working tree without git, so
export the revision here first and carry it there (``.revisions/`` is ignored by git)::

    python benchmarks/compare_revisions.py 37d70f0 --export             # here: writes .revisions/37d70f0/
    run(command="python3 benchmarks/compare_revisions.py 37d70f0 --exported --device gpu --preset small "
                "--batch 128 --steps 80", carry=[".revisions"])           # there

A change that alters state the whole process shares (the BLAS's thread count, say) also changes the
other version's speed when both run in one process. ``--processes N`` then runs each version in fresh
processes instead, N of each, alternating, and compares each process with the one that ran next to it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REVISIONS = os.path.join(ROOT, ".revisions")  # --export's output (ignored by git; the device tool can carry it)
LATENT = {"default": 128, "small": 32}  # the presets' latent sizes, for the fixed noise


def export_revision(rev, directory):
    """Write ``rev``'s scratchvae/ into ``directory/scratchvae_rev``; return the import name."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev, "scratchvae"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    os.rename(os.path.join(directory, "scratchvae"), os.path.join(directory, "scratchvae_rev"))
    return "scratchvae_rev"


@contextlib.contextmanager
def revision_package(rev, exported):
    """``(import name, folder to put on sys.path)`` of ``rev``'s package: exported now into a temporary folder, or
    (``exported``) the one ``--export`` wrote earlier."""
    if exported:
        path = os.path.join(REVISIONS, rev)
        if not os.path.isdir(os.path.join(path, "scratchvae_rev")):
            raise SystemExit(f"no exported revision in {path}: run this script with {rev} --export where git is "
                             "(and carry .revisions/ to this machine)")
        yield "scratchvae_rev", path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield export_revision(rev, tmp), tmp


def build(package, preset, batch, device="cpu"):
    """A model of ``package`` on ``device``, its Adam, and its training step on a fixed batch with fixed noise
    (synchronised on a GPU), with per-layer timers on the CPU (None on a GPU)."""
    importlib.import_module(package)  # before NumPy, as a user's script imports it (it may set up OpenBLAS's threads)
    import numpy  # noqa: PLC0415

    from bench_train import wrap_layers  # noqa: PLC0415

    backend = importlib.import_module(package + ".backend")
    vae = importlib.import_module(package + ".vae")
    optim = importlib.import_module(package + ".optim")
    xp = backend.set_device(device)
    model = vae.VAE(image_size=64, preset=preset)
    # the engine's own Adam where the revision has one (since the two engines), else its only one
    optimizer = model.make_optimizer(lr=1e-3) if hasattr(model, "make_optimizer") else optim.Adam(model, lr=1e-3)
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.integers(0, 256, (batch, 3, 64, 64), dtype=numpy.uint8).astype(numpy.float32) / 255)
    eps = xp.asarray(rng.standard_normal((1, batch, LATENT[preset])).astype(numpy.float32))
    sync = xp.cuda.Device().synchronize if device == "gpu" else (lambda: None)
    timers = wrap_layers(model, sync) if device == "cpu" else None

    def step():
        model.train_step(x, optimizer, eps=eps)
        sync()
    return step, timers


def step_times(package, preset, batch, steps, device="cpu"):
    """Milliseconds of ``steps`` training steps of ``package``'s model, after warm-up steps."""
    from bench_train import GPU_WARMUP_S, time_steps  # noqa: PLC0415

    step, _ = build(package, preset, batch, device)
    return [t * 1e3 for t in time_steps(step, 2, steps, warmup_s=GPU_WARMUP_S if device == "gpu" else 0.0)]


def in_processes(args, package, tmp):
    """``--processes``: each version in its own fresh processes, alternating; prints the comparison."""
    medians = {args.rev: [], "working tree": []}
    for i in range(args.processes):
        names = list(medians) if i % 2 == 0 else list(medians)[::-1]
        for name in names:
            pkg, path = (package, tmp) if name == args.rev else ("scratchvae", ROOT)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", pkg, path, args.preset, str(args.batch),
                   str(args.steps), args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
            medians[name].append(statistics.median(json.loads(out.splitlines()[-1])))
            print(f"  {name}: median step {medians[name][-1]:.1f} ms", flush=True)
    old, new = medians[args.rev], medians["working tree"]
    ratios = sorted(a / b for a, b in zip(old, new))
    print(f"{args.preset} preset, batch {args.batch}, {args.processes} processes of each version, "
          f"{args.steps} steps each, on the {args.device}")
    print(f"  {args.rev}: median process {statistics.median(old):.1f} ms per step")
    print(f"  working tree: median process {statistics.median(new):.1f} ms per step")
    print(f"  {args.rev} time / working-tree time, process by process: median {statistics.median(ratios):.3f} "
          f"(range {ratios[0]:.3f} - {ratios[-1]:.3f}; above 1 means the working tree is faster)")


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        package, path, preset, batch, steps, device = sys.argv[2:8]
        sys.path[:0] = [HERE, path]
        print(json.dumps(step_times(package, preset, int(batch), int(steps), device)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="git revision to compare the working tree with (e.g. HEAD, HEAD~1, main)")
    p.add_argument("--preset", default="small", choices=["small", "default"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps of each version")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--processes", type=int, default=0,
                   help="run each version in N fresh processes instead of both in this one (see above)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--export", action="store_true",
                   help="only write the revision's package into .revisions/REV, for a machine without git")
    p.add_argument("--exported", action="store_true", help="compare with the package --export wrote")
    args = p.parse_args(argv)
    if args.export:
        target = os.path.join(REVISIONS, args.rev)
        if os.path.exists(target):
            raise SystemExit(f"{target} exists already; remove it to export {args.rev} again")
        os.makedirs(target)
        export_revision(args.rev, target)
        print(f"wrote {target}/scratchvae_rev: carry .revisions to the machine that runs the comparison")
        return
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SCRATCHVAE_THREADS"):
        os.environ[var] = str(args.threads)

    if args.processes:
        with revision_package(args.rev, args.exported) as (package, path):
            return in_processes(args, package, path)
    with revision_package(args.rev, args.exported) as (package, path):
        sys.path[:0] = [HERE, ROOT, path]  # bench_train's layer timers; this tree's package; the revision's
        from bench_train import GPU_WARMUP_S, time_steps  # noqa: PLC0415
        versions = {args.rev: build(package, args.preset, args.batch, args.device),
                    "working tree": build("scratchvae", args.preset, args.batch, args.device)}

        def both():
            for step, _ in versions.values():
                step()
        # warm-up, the versions in turn: work arrays allocated, caches filled (a GPU busy for a while)
        time_steps(both, 2, 0, warmup_s=GPU_WARMUP_S if args.device == "gpu" else 0.0)
        for _, timers in versions.values():
            for fb in (timers or {}).values():
                fb[:] = [0.0, 0.0]
        times = {name: [] for name in versions}
        order = list(versions)
        for i in range(args.steps):
            for name in (order if i % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                versions[name][0]()
                times[name].append((time.perf_counter() - t) * 1e3)

    old, new = times[args.rev], times["working tree"]
    ratios = [a / b for a, b in zip(old, new)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"{args.preset} preset, batch {args.batch}, {args.steps} interleaved steps each, on the {args.device}"
          + (f", {args.threads} threads" if args.device == "cpu" else ""))
    print(f"  {args.rev}: median step {statistics.median(old):.1f} ms")
    print(f"  working tree: median step {statistics.median(new):.1f} ms")
    print(f"  {args.rev} time / working-tree time, per pair of steps: median {statistics.median(ratios):.3f} "
          f"(quartiles {q1:.3f} - {q3:.3f}; above 1 means the working tree is faster)")
    if versions[args.rev][1] is None:
        return
    print(f"\n{'layer':40s} {args.rev + ' f / b':>17s} {'tree f / b':>17s}  {'difference':>10s}  (ms per step)")
    old_t, new_t = versions[args.rev][1], versions["working tree"][1]
    for name in old_t:
        a = [v / args.steps * 1e3 for v in old_t[name]]
        b = [v / args.steps * 1e3 for v in new_t.get(name, [0.0, 0.0])]
        print(f"{name:40s} {a[0]:7.2f} / {a[1]:7.2f} {b[0]:7.2f} / {b[1]:7.2f}  {sum(b) - sum(a):+10.2f}")
    total = [sum(map(sum, t.values())) / args.steps * 1e3 for t in (old_t, new_t)]
    print(f"{'all layers':40s} {total[0]:17.1f} {total[1]:17.1f}  {total[1] - total[0]:+10.2f}")


if __name__ == "__main__":
    main()
