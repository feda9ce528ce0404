"""Training-step benchmark: scratchvae on NumPy (and CuPy where a GPU is usable) against PyTorch.

    python benchmarks/bench_train.py            # full run: default and small presets, batch 64 and 128
    python benchmarks/bench_train.py --quick    # fewer steps, batch 64 only
    python benchmarks/bench_train.py --reference   # also the reference engine (the textbook layers)
    python benchmarks/bench_train.py --torch-configs eager channels_last   # PyTorch without torch.compile

Prints, for every framework (scratchvae's fast engine, its reference engine with ``--reference``, PyTorch),
preset and batch size: images/s of a whole training step (forward, backward,
Adam), the step time and the peak memory; the ratio scratchvae / PyTorch where PyTorch is installed (it is
not a dependency: without it that part is skipped with a line saying so); a per-layer forward/backward
breakdown of each preset at batch 64 (scratchvae and PyTorch side by side); and the time to
assemble a batch from a uint8 memory-mapped cache with ``scratchvae.data.Batches``.

PyTorch runs in three configurations (``--torch-configs``, default all), on each device:
``torch`` eager with NCHW tensors, as ``pytorch_vae.py`` builds it by default; ``torch_cl`` eager with the
model and its inputs in ``channels_last``; ``torch_compile`` channels_last with the loss (the forward, and by
AOT autograd its backward) through ``torch.compile``. Where torch.compile does not work (no C++ compiler; on
a GPU, no triton) a line says so and why, and the others carry on. The ratio scratchvae / PyTorch is printed
against each configuration, and against the strongest (the most images/s for that preset, batch and device):
that one is what the targets in ``benchmarks/README.md`` are measured against. Peak memory likewise, against
each and against the smallest PyTorch peak. PyTorch's per-layer column runs its stronger eager layout
(a compiled graph cannot be timed layer by layer).

Method. Every configuration runs in a fresh Python process, so that its peak memory is its own: on the
CPU that is the process's peak resident set (``ru_maxrss``), which counts everything (interpreter,
libraries, OpenBLAS buffers, every array) -- tracemalloc would miss memory NumPy does not allocate itself.
On the GPU it is the peak of the framework's device memory pool. Both frameworks get the same number of
threads (``--threads``, default 2): OPENBLAS/OMP/MKL_NUM_THREADS for NumPy and SCRATCHVAE_THREADS for the fast
engine's elementwise threads, ``torch.set_num_threads`` for
PyTorch. Each process warms up, then times ``--steps`` steps one by one (``--gpu-steps`` on a GPU, after at
least ``GPU_WARMUP_S`` seconds of warm-up); images/s is batch / median
step.
A compiled configuration compiles in its first step (and again in the first step of a new batch size): it
warms up for that step plus at least 2 more (``--warmup``), so that every timed step runs the compiled code,
and reports the compile + warm-up time of each process.
Other processes on the machine disturb the figures, so the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# the PyTorch configurations (--torch-configs): the framework kind each runs as, its memory format, compiled
TORCH_CONFIGS = {"eager": ("torch", "contiguous", False),
                 "channels_last": ("torch_cl", "channels_last", False),
                 "compile": ("torch_compile", "channels_last", True)}
TORCH_KINDS = {kind: (memory_format, compiled) for kind, memory_format, compiled in TORCH_CONFIGS.values()}
DEVICES = ("cpu", "gpu")
TORCH_DESCRIPTIONS = {"eager": "torch: eager, NCHW", "channels_last": "torch_cl: eager, channels_last",
                      "compile": "torch_compile: channels_last + torch.compile"}
TORCH_LAYOUTS = {"contiguous": "module and inputs NCHW", "channels_last": "module and inputs channels_last"}


def parse_framework(name):
    """(kind, device) of a framework name such as ``torch_compile-cpu``: the device is the last ``-`` part."""
    kind, _, device = name.rpartition("-")
    kinds = ("scratchvae", "reference", *TORCH_KINDS)
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} in framework {name!r}: expected KIND-DEVICE, the device one of "
                         f"{', '.join(DEVICES)}")
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r} in framework {name!r}: expected KIND-DEVICE, the kind one of "
                         f"{', '.join(kinds)}")
    return kind, device


def is_torch(name):
    """Whether framework ``name`` is one of the PyTorch configurations."""
    return parse_framework(name)[0] in TORCH_KINDS


def build_frameworks(devices, reference, torch_configs):
    """The framework names to time, in the order each round runs them: scratchvae's fast engine, the reference
    engine (if asked), then each PyTorch configuration (``torch_configs``, empty without PyTorch)."""
    names = [f"scratchvae-{d}" for d in devices] + ([f"reference-{d}" for d in devices] if reference else [])
    return names + [f"{TORCH_CONFIGS[c][0]}-{d}" for c in torch_configs for d in devices]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, batch 64 only")
    p.add_argument("--presets", nargs="+", default=["default", "small"])
    p.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default: 64 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (on a GPU also at least 2 s of them)")
    p.add_argument("--gpu-steps", type=int, default=None, help="timed steps per configuration on a GPU, whose "
                   "steps take milliseconds (default 50, quick 10)")
    p.add_argument("--rounds", type=int, default=None,
                   help="fresh processes per configuration, frameworks alternating (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    p.add_argument("--devices", nargs="+", choices=("cpu", "gpu"), default=("cpu", "gpu"),
                   help="which devices to time (default both, the GPU where one is usable); "
                        "--devices gpu skips the CPU runs, for a GPU machine lent for a short time")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    p.add_argument("--torch-configs", nargs="+", choices=tuple(TORCH_CONFIGS), default=list(TORCH_CONFIGS),
                   help="which PyTorch configurations to time (default all): eager (NCHW), channels_last "
                        "(eager), compile (channels_last + torch.compile)")
    p.add_argument("--reference", action="store_true", help="also time scratchvae's reference engine (the textbook "
                   "layers), to show what the fast engine's tricks buy")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer breakdown")
    p.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "PRESET", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--layers", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = args.batches or ([64] if args.quick else [64, 128])
    args.steps = args.steps or (3 if args.quick else 10)
    args.gpu_steps = args.gpu_steps or (10 if args.quick else 50)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def set_thread_env(threads):
    """Thread counts for the BLAS and OpenMP pools and the fast engine's threads: set before NumPy or PyTorch loads."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SCRATCHVAE_THREADS"):
        os.environ[var] = str(threads)


# ---- one configuration, in its own process ------------------------------------------------------------------

def peak_rss_mb():
    import resource  # noqa: PLC0415  (Linux: ru_maxrss in KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, warmup, steps, sync=lambda: None, timers=None, warmup_s=0.0, info=None):
    """Sorted wall times of ``steps`` calls of ``step`` after untimed ones: at least ``warmup`` of them, and for at
    least ``warmup_s`` seconds (timers reset after warm-up). ``info["warmup_s"]`` gets the warm-up's time."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < warmup_s:
        step()
        sync()
        done += 1
    if info is not None:
        info["warmup_s"] = time.perf_counter() - start
    for fb in (timers or {}).values():
        fb[:] = [0.0, 0.0]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)


def issue_times(work, sync, steps):
    """Sorted (host, total) seconds of ``steps`` runs of ``work`` on a GPU: ``host`` the time the host takes to
    queue it (the call returns before the GPU is done), ``total`` until the GPU has finished it. Where the two
    are close, issuing the work (Python, launches) bounds the step, not the GPU."""
    runs = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        work()
        queued = time.perf_counter()
        sync()
        runs.append((queued - t, time.perf_counter() - t))
    return sorted(runs)


# a GPU process warms up for this many seconds (and at least --warmup steps) before it times anything: a
# precaution, since an idle GPU runs at a fraction of its clock until it has been busy a while, and CuPy and
# PyTorch finish setting up in the first steps. (A first H200 run with 2 warm-up steps and 10 timed gave medians
# of 16-17 ms for a step that later runs gave at 9-11; that step was bound by the host, queued = done, so the
# host's own state, right after 8 test processes, was the likelier cause.)
GPU_WARMUP_S = 2.0

PRESETS = {"default": ((32, 64, 128, 256, 512), 128), "small": ((16, 32, 64, 128), 32)}
# each process also times steps of this many images, after its own batch's: the part of a step that does not
# grow with the batch (Python, kernel launches, small products), which bounds a GPU step from below
SMALL_BATCH = 2


def scratchvae_worker(device, preset, batch, args, engine="fast"):
    """images/s, step times and peak memory of ``VAE.train_step`` (and the per-layer split with --layers)."""
    import scratchvae  # noqa: F401, PLC0415  (first, as a user's script imports it: it sets up OpenBLAS's threads)
    import numpy  # noqa: PLC0415

    from scratchvae import backend  # noqa: PLC0415
    from scratchvae.train import NOISE_STREAM  # noqa: PLC0415
    from scratchvae.vae import VAE  # noqa: PLC0415

    xp = backend.set_device(device)
    base_rss = peak_rss_mb()
    model = VAE(image_size=64, preset=preset, engine=engine)
    optimizer = model.make_optimizer(lr=1e-3)
    images = numpy.random.default_rng(0).integers(0, 256, (batch, 3, 64, 64), dtype=numpy.uint8)
    x = backend.to_device(images, numpy.float32) / 255
    sync = xp.cuda.Device().synchronize if device == "gpu" else (lambda: None)
    timers = wrap_layers(model, sync) if args.layers else None
    steps = itertools.count(1)

    def step(images):  # as the training loop runs it: each update's noise from a generator seeded for it
        return model.train_step(images, optimizer, rng=backend.rng((0, NOISE_STREAM, next(steps))))

    warmup_s = GPU_WARMUP_S if device == "gpu" else 0.0
    times = time_steps(lambda: step(x), args.warmup, args.steps, sync, timers, warmup_s)
    out = {"step_s": times, "base_rss_mb": base_rss, "peak_rss_mb": peak_rss_mb()}
    if device == "gpu":
        out["peak_device_mb"] = xp.get_default_memory_pool().total_bytes() / 2**20
        if timers is None:  # forward and backward alone: the step's one wait (for the logged scalars) comes after
            eps = model.draw_eps(len(x), backend.rng((0, NOISE_STREAM, 0)))  # fixed noise, as PyTorch's below

            def forward_backward():
                model.zero_grad()
                model.forward_backward(x, eps=eps)
            out["issue_s"] = issue_times(forward_backward, sync, args.steps)
    if timers is not None:
        out["layers"] = {name: [t / args.steps * 1e3 for t in fb] for name, fb in timers.items()}
        out["mean_step_ms"] = sum(times) / len(times) * 1e3  # the same steps the layer times are means of
    else:  # (not in a per-layer run, whose layer timers would count these steps too)
        out["small_step_s"] = time_steps(lambda: step(x[:SMALL_BATCH]), args.warmup, args.steps, sync,
                                         warmup_s=warmup_s)
    return out


def layer_label(name, mod):
    """'encoder.0 Conv2d 3->32 s2' style labels, the same for both frameworks."""
    kind = type(mod).__name__.replace("Unflatten", "Reshape")
    label = f"{name} {kind}"
    if hasattr(mod, "in_channels"):
        stride = mod.stride[0] if isinstance(mod.stride, tuple) else mod.stride
        label += f" {mod.in_channels}->{mod.out_channels}" + (f" s{stride}" if stride > 1 else "")
    return label


def wrap_layers(model, sync):
    """Time every layer's forward and backward inside the model (instance attributes shadow the methods)."""
    timers = {}
    named = [(f"encoder.{i}", m) for i, m in enumerate(model.encoder.layers)]
    named += [("fc_mu", model.fc_mu), ("fc_logvar", model.fc_logvar)]
    named += [(f"decoder.{i}", m) for i, m in enumerate(model.decoder.layers)]
    for name, mod in named:
        acc = timers.setdefault(layer_label(name, mod), [0.0, 0.0])

        def timed(fn, slot, acc=acc):
            def run(a, **options):
                sync()
                t = time.perf_counter()
                out = fn(a, **options)
                sync()
                acc[slot] += time.perf_counter() - t
                return out
            return run
        mod.forward, mod.backward = timed(mod.forward, 0), timed(mod.backward, 1)
    return timers


def torch_worker(kind, device, preset, batch, args):
    """The same measurements for the PyTorch model of ``pytorch_vae.py`` in configuration ``kind`` (a key of
    ``TORCH_KINDS``); a compiled one whose compilation fails returns ``{"error": why}`` instead."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, HERE)
    from pytorch_vae import make_train_step, to_layout  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    # float32 arithmetic on both sides: PyTorch lets cuDNN convolutions use TF32 (a 10-bit mantissa) by
    # default on recent GPUs, while CuPy's matrix products stay float32 unless CUPY_TF32=1
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    base_rss = peak_rss_mb()
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    channels, latent = PRESETS[preset]
    memory_format, compiled = TORCH_KINDS[kind]
    compiled = compiled and not args.layers  # (a compiled graph has no layers to time: the layout alone)
    model, _, step = make_train_step(channels, latent, memory_format=memory_format, compile=compiled, device=dev)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (batch, 3, 64, 64), generator=gen, dtype=torch.uint8).float() / 255).to(dev)
    x = to_layout(x, memory_format)  # once, outside the timing, as a data loader would hand it over
    eps = torch.randn(batch, latent, generator=gen).to(dev)
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    warmup_s = GPU_WARMUP_S if device == "gpu" else 0.0
    out = {"version": torch.__version__, "threads": torch.get_num_threads(), "memory_format": memory_format,
           "compiled": compiled}
    warmup = args.warmup
    if compiled:  # the first step compiles, and raises where torch.compile does not work here
        t = time.perf_counter()
        try:
            step(x, eps)
            sync()
        except Exception as e:  # noqa: BLE001  (any failure of the compiler stack: say why, let the others run)
            return {"error": compile_failure(e, device), "compiled": True}
        out["compile_s"] = time.perf_counter() - t
        warmup = max(args.warmup, 2)  # and at least 2 compiled steps after it, before any is timed
    info = {}
    times = time_steps(lambda: step(x, eps), warmup, args.steps, sync, warmup_s=warmup_s, info=info)
    out["warmup_s"] = out.get("compile_s", 0.0) + info["warmup_s"]
    out.update(step_s=times, base_rss_mb=base_rss, peak_rss_mb=peak_rss_mb())
    if device == "gpu":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if not args.layers:
            def forward_backward():
                model.zero_grad(set_to_none=False)
                step.loss(x, eps).backward()
            out["issue_s"] = issue_times(forward_backward, sync, args.steps)
    if args.layers:
        out["layers"] = torch_layer_times(model, x, eps, sync, args.steps)
    else:  # (compiled: the new batch size compiles again in its first step, so one more warm-up step)
        small_warmup = warmup + (1 if compiled else 0)
        out["small_step_s"] = time_steps(lambda: step(x[:SMALL_BATCH], eps[:SMALL_BATCH]), small_warmup, args.steps,
                                         sync, warmup_s=warmup_s)
    return out


def compile_failure(error, device):
    """One line saying that torch.compile does not work on this device here, and why (the error's first line)."""
    why = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")
    why = f"{type(error).__name__}: {why}" if why else type(error).__name__
    where = "on the GPU" if device == "gpu" else "on the CPU"
    return f"torch.compile does not work here {where} ({why[:300]})"


def torch_layer_times(model, x, eps, sync, repeats):
    """Forward and backward ms of every PyTorch layer, each run alone on an input of the shape it sees in
    the model (hooks inside the model would slow PyTorch's autograd down far more than they measure)."""
    import torch  # noqa: PLC0415

    inputs = {}
    named = [(f"encoder.{i}", m) for i, m in enumerate(model.encoder)]
    named += [("fc_mu", model.fc_mu), ("fc_logvar", model.fc_logvar)]
    named += [(f"decoder.{i}", m) for i, m in enumerate(model.decoder)]
    def keep_input(name):
        def hook(mod, args, output):  # returns None: a hook's return value would replace the output
            inputs.setdefault(name, args[0].detach())
        return hook

    handles = [m.register_forward_hook(keep_input(name)) for name, m in named]
    model.loss(x, eps).backward()
    for h in handles:
        h.remove()
    timers = {}
    for name, mod in named:
        inp = inputs[name].clone().requires_grad_(name != "encoder.0")  # the images need no gradient
        out = mod(inp)
        grad = torch.randn_like(out)
        fwd, bwd = [], []
        for _ in range(repeats + 1):
            sync()
            t = time.perf_counter()
            out = mod(inp)
            sync()
            t1 = time.perf_counter()
            out.backward(grad)
            sync()
            fwd.append(t1 - t)
            bwd.append(time.perf_counter() - t1)
        timers[layer_label(name, mod)] = [sorted(fwd[1:])[repeats // 2] * 1e3, sorted(bwd[1:])[repeats // 2] * 1e3]
    return timers


def worker_main(args):
    framework, preset, batch = args.worker[0], args.worker[1], int(args.worker[2])
    kind, device = parse_framework(framework)
    if kind in TORCH_KINDS:
        result = torch_worker(kind, device, preset, batch, args)
    else:  # scratchvae (the fast engine) or reference
        result = scratchvae_worker(device, preset, batch, args, engine="reference" if kind == "reference" else "fast")
    print("RESULT " + json.dumps(result))


# ---- the driver ---------------------------------------------------------------------------------------------

def run_worker(framework, preset, batch, args, layers=False):
    steps = args.gpu_steps if framework.endswith("-gpu") else args.steps
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, preset, str(batch),
           "--steps", str(steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if layers:
        cmd.append("--layers")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    print(f"  {framework} {preset} batch {batch}: failed ({' | '.join(tail)})")
    return None


def load():
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def environment(args):
    import numpy  # noqa: PLC0415

    from scratchvae import backend  # noqa: PLC0415

    lines = [f"python {sys.version.split()[0]}, numpy {numpy.__version__}, {os.cpu_count()} CPUs, "
             f"threads {args.threads}, {load()}"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    lines.append(f"CPU: {cpu}")
    blas = numpy.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    lines.append(f"BLAS: {blas.get('name', '?')} {blas.get('version', '')}")
    env = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_") and k != "OPENBLAS_NUM_THREADS"}
    lines.append("OpenBLAS environment: " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none set")
                 + " (scratchvae's processes import it first, which sets OPENBLAS_THREAD_TIMEOUT=4 where it is unset)")
    a = numpy.random.default_rng(0).random((2048, 2048), dtype=numpy.float32)
    a @ a
    t = min(timed(lambda: a @ a) for _ in range(5))
    lines.append(f"float32 matrix product 2048^3: {2 * 2048 ** 3 / t / 1e9:.0f} GFLOP/s")
    gpu = backend.gpu_available()
    lines.append("GPU: " + ("usable (CuPy)" if gpu else "none usable: the CuPy figures are skipped"))
    return lines, gpu


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def torch_available():
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("torch") is not None


def merge_rounds(runs):
    """One result from several processes: their median step times (sorted, and in the order the processes
    ran, None for a failed one), and the largest peak memory."""
    in_order = [r["step_s"][len(r["step_s"]) // 2] if r else None for r in runs]
    runs = [r for r in runs if r]
    if not runs:
        return None
    merged = dict(runs[0])
    merged["step_s"] = sorted(t for t in in_order if t is not None)
    merged["round_step_s"] = in_order
    merged["small_step_s"] = sorted(r["small_step_s"][len(r["small_step_s"]) // 2] for r in runs)
    merged["issue_s"] = [t for r in runs for t in r.get("issue_s", [])]  # (GPU only) every process's runs
    for key in ("peak_rss_mb", "peak_device_mb", "compile_s", "warmup_s"):
        if key in merged:
            merged[key] = max(r[key] for r in runs)
    return merged


def summarize(result, batch):
    med = result["step_s"][len(result["step_s"]) // 2]
    return batch / med, med * 1e3


def process_line(fw, preset, batch, r):
    """The line printed as each process ends: its images/s, step times and peak memory (and compile time)."""
    ips, ms = summarize(r, batch)
    line = f"  {fw:>17s} {preset:8s} batch {batch:4d}: {ips:7.1f} img/s  ({ms:.1f} ms/step, " \
           f"best {min(r['step_s']) * 1e3:.1f}, peak RSS {r['peak_rss_mb']:.0f} MB"
    if "compile_s" in r:
        line += f", compile + warm-up {r['warmup_s']:.1f} s of which the first step {r['compile_s']:.1f} s"
    return line + ")"


def left_out_line(fw, why):
    """The line that says a framework cannot run here (``why``) and that the benchmark goes on without it."""
    return f"  {fw}: {why}; left out, the other configurations carry on"


def run_configurations(frameworks, args, run=None):
    """Every configuration's result by (framework, preset, batch), and {framework: why} for those that cannot
    run here. Each process is fresh, the frameworks alternate round by round; a framework whose worker reports
    it cannot run (torch.compile without a compiler) is said so once and not run again."""
    run = run or run_worker
    results, left_out = {}, {}
    for preset in args.presets:
        for batch in args.batches:
            runs = {fw: [] for fw in frameworks}
            for _ in range(args.rounds):  # alternate the frameworks, so that all see the same disturbances
                for fw in frameworks:
                    if fw in left_out:
                        continue
                    r = run(fw, preset, batch, args)
                    if r and "error" in r:
                        left_out[fw] = r["error"]
                        print(left_out_line(fw, r["error"]), flush=True)
                        continue
                    runs[fw].append(r)
                    if r:
                        print(process_line(fw, preset, batch, r), flush=True)
            for fw in frameworks:
                results[(fw, preset, batch)] = merge_rounds(runs[fw])
    return results, left_out


def print_throughput(results, frameworks, args):
    print(f"\n== Training step (forward + backward + Adam), images/s: median step, median of {args.rounds} process(es);"
          " [slowest - fastest process] ==")
    head = f"{'preset':8s} {'batch':>5s}  " + "  ".join(f"{fw:>33s}" for fw in frameworks)
    print(head)
    for preset in args.presets:
        for batch in args.batches:
            cells = []
            for fw in frameworks:
                r = results.get((fw, preset, batch))
                if r is None:
                    cells.append(f"{'-':>33s}")
                    continue
                ips, ms = summarize(r, batch)
                spread = f"[{batch / max(r['step_s']):.0f}-{batch / min(r['step_s']):.0f}]"
                cells.append(f"{ips:7.1f} {spread:>9s} img/s {ms:6.0f} ms")
            print(f"{preset:8s} {batch:5d}  " + "  ".join(cells))


def paired_ratios(a, b):
    """images/s ratios of the processes that ran one right after the other (round i of each framework):
    the host's load drifts over minutes, so neighbours in time compare more fairly than the two medians."""
    return sorted(tb / ta for ta, tb in zip(a["round_step_s"], b["round_step_s"]) if ta and tb)


def ratio_text(a, b, batch):
    """'ratio of a's images/s to b's' and, over several processes, the ratios process by process."""
    text = f"{summarize(a, batch)[0] / summarize(b, batch)[0]:5.2f}"
    paired = paired_ratios(a, b)
    if len(paired) > 1:
        ahead = sum(r >= 1.0 for r in paired)
        text += (f"   (process by process: median {statistics.median_low(paired):.2f}, "
                 f"{paired[0]:.2f}-{paired[-1]:.2f}, at least 1.0 in {ahead} of {len(paired)})")
    return text


def ratio_pairs(frameworks):
    """(ours, theirs) to compare: the fast engine against every PyTorch configuration and the reference engine,
    device by device."""
    pairs = []
    for ours in (fw for fw in frameworks if parse_framework(fw)[0] == "scratchvae"):
        device = parse_framework(ours)[1]
        pairs += [(ours, fw) for fw in frameworks
                  if fw != ours and parse_framework(fw)[1] == device and parse_framework(fw)[0] != "scratchvae"]
    return pairs


def print_ratios(results, pairs, args):
    print("\n== Ratio scratchvae (the fast engine) / the other (images/s; >= 1.0 means the fast engine is at least as "
          "fast) ==")
    for ours, theirs in pairs:
        for preset in args.presets:
            for batch in args.batches:
                a, b = results.get((ours, preset, batch)), results.get((theirs, preset, batch))
                if a and b:
                    print(f"{ours:>14s} / {theirs:<17s} {preset:8s} batch {batch:4d}: {ratio_text(a, b, batch)}")


def torch_frameworks(frameworks, device, eager_only=False):
    """The PyTorch configurations among ``frameworks`` on ``device`` (only the uncompiled ones if asked)."""
    return [fw for fw in frameworks if is_torch(fw) and parse_framework(fw)[1] == device
            and not (eager_only and TORCH_KINDS[parse_framework(fw)[0]][1])]


def strongest(results, candidates, preset, batch):
    """The framework among ``candidates`` with the most images/s for this preset and batch (None if none ran)."""
    timed = [(summarize(results[(fw, preset, batch)], batch)[0], fw) for fw in candidates
             if results.get((fw, preset, batch))]
    return max(timed)[1] if timed else None


def print_strongest(results, frameworks, args, left_out=None):
    """scratchvae / the strongest PyTorch configuration, per preset, batch and device: what the targets mean."""
    lines = []
    for ours in (fw for fw in frameworks if parse_framework(fw)[0] == "scratchvae"):
        theirs = torch_frameworks(frameworks, parse_framework(ours)[1])
        for preset in args.presets:
            for batch in args.batches:
                a, best = results.get((ours, preset, batch)), strongest(results, theirs, preset, batch)
                if a is None or best is None:
                    continue
                others = ", ".join(f"{fw} {summarize(results[(fw, preset, batch)], batch)[0]:.1f}" for fw in theirs
                                   if fw != best and results.get((fw, preset, batch)))
                b = results[(best, preset, batch)]
                lines.append(f"{ours:>14s} / STRONGEST PyTorch {preset:8s} batch {batch:4d}: "
                             f"{ratio_text(a, b, batch)}\n{'':>17s}the strongest: {best}, "
                             f"{summarize(b, batch)[0]:.1f} img/s" + (f" (the others: {others})" if others else ""))
    if not lines:
        return
    print("\n== Against PyTorch at its best: scratchvae / the strongest PyTorch configuration (the most images/s for "
          "that preset, batch and device), the one the targets are measured against ==")
    for line in lines:
        print(line)
    for fw, why in sorted((left_out or {}).items()):
        print(f"  (not among them: {fw}, {why})")


def peak_mb(result, device):
    """The peak memory the target compares: the device pool on a GPU, the whole process's resident set on the CPU."""
    return result["peak_device_mb"] if device == "gpu" else result["peak_rss_mb"]


def print_memory_ratios(results, frameworks, args):
    """scratchvae's peak memory against each PyTorch configuration's (ours / theirs) and against the smallest."""
    lines = []
    for ours in (fw for fw in frameworks if parse_framework(fw)[0] == "scratchvae"):
        device = parse_framework(ours)[1]
        theirs = torch_frameworks(frameworks, device)
        for preset in args.presets:
            for batch in args.batches:
                a = results.get((ours, preset, batch))
                peaks = {fw: peak_mb(results[(fw, preset, batch)], device) for fw in theirs
                         if results.get((fw, preset, batch))}
                if a is None or not peaks:
                    continue
                mine = peak_mb(a, device)
                each = ", ".join(f"{fw} {mb:.0f} MB: {mine / mb:.2f}" for fw, mb in peaks.items())
                least = min(peaks, key=peaks.get)
                lines.append(f"{ours:>14s} {preset:8s} batch {batch:4d}: {mine:.0f} MB; ours / theirs: {each}\n"
                             f"{'':>17s}against the smallest PyTorch peak ({least}, {peaks[least]:.0f} MB): "
                             f"{mine / peaks[least]:.2f}")
    if lines:
        print("\n== Peak memory, scratchvae / PyTorch (ours / theirs; at most 1.0 means no more than PyTorch; the "
              "CPU: the process's peak RSS, a GPU: the device pool) ==")
        for line in lines:
            print(line)


def print_compile_times(results):
    """Each compiled configuration's compile + warm-up time (the slowest of its processes)."""
    rows = [(key, r) for key, r in sorted(results.items()) if r is not None and "compile_s" in r]
    if rows:
        print("\n== torch.compile: the slowest process's compile + warm-up (untimed) ==")
        for (fw, preset, batch), r in rows:
            print(f"{fw:>17s} {preset:8s} batch {batch:4d}: {r['warmup_s']:.1f} s, of which the first step "
                  f"(compilation) {r['compile_s']:.1f} s")


def print_memory(results):
    print("\n== Peak memory ==")
    for (fw, preset, batch), r in sorted(results.items()):
        if r is None:
            continue
        line = f"{fw:>17s} {preset:8s} batch {batch:4d}: peak RSS {r['peak_rss_mb']:7.0f} MB " \
               f"(process before the model: {r['base_rss_mb']:.0f} MB)"
        if "peak_device_mb" in r:
            line += f", device pool {r['peak_device_mb']:.0f} MB"
        print(line)


def print_issue_times(results):
    rows = [(key, r["issue_s"]) for key, r in sorted(results.items()) if r is not None and r.get("issue_s")]
    if not rows:
        return
    print("\n== On the GPU: forward + backward, the time the host takes to queue it against the time until the GPU "
          "has done it (median) ==")
    for (fw, preset, batch), runs in rows:
        host, total = (statistics.median(t[i] for t in runs) * 1e3 for i in (0, 1))
        print(f"{fw:>14s} {preset:8s} batch {batch:4d}: queued in {host:6.2f} ms, done after {total:6.2f} ms "
              f"({host / total:.0%})")
    print("  (near 100%: the GPU waits for the host, and fewer launches or less Python per launch would pay; well "
          "below: the GPU's own work bounds the step)")


def print_small_steps(results):
    print(f"\n== A step of {SMALL_BATCH} images (median), against a step of the batch: the cost that does not grow "
          "with the batch ==")
    for (fw, preset, batch), r in sorted(results.items()):
        if r is not None and "small_step_s" in r:
            small, full = (t[len(t) // 2] * 1e3 for t in (r["small_step_s"], r["step_s"]))
            print(f"{fw:>14s} {preset:8s} batch {batch:4d}: {small:7.1f} ms of {full:7.1f} ms ({small / full:.0%})")
    print("  (where a step of a few images takes most of a full one, as on a GPU with small layers, issuing the work "
          "- Python, kernel launches - bounds the step, not the arithmetic)")


def layer_framework(results, frameworks, device, preset):
    """The PyTorch configuration whose layers the per-layer breakdown times: the eager one with the most images/s
    at batch 64 (channels_last where none ran at 64; channels_last too where only torch.compile is timed, whose
    layout it is); None without PyTorch."""
    eager = torch_frameworks(frameworks, device, eager_only=True)
    if not torch_frameworks(frameworks, device):
        return None
    return strongest(results, eager, preset, 64) or next((fw for fw in eager if fw.startswith("torch_cl-")),
                                                         eager[0] if eager else f"torch_cl-{device}")


def print_layers(ours, theirs, ours_name, theirs_name, step_ms, preset):
    print(f"\n== Per layer, {preset} model, batch 64: forward / backward ms per step ==")
    names = list(ours["layers"]) if ours else list(theirs["layers"])
    head = f"{'layer':36s} {ours_name:>17s}"
    if theirs:
        head += f" {theirs_name:>17s} {'ratio':>6s}"
    print(head)
    # scratchvae runs a LeakyReLU that follows a BatchNorm2d inside it (Sequential joins them): that row is
    # empty on our side, and the BatchNorm row's ratio compares with PyTorch's two layers together
    joined = {name for prev, name in zip(names, names[1:]) if "LeakyReLU" in name and "BatchNorm2d" in prev
              and ours and sum(ours["layers"].get(name, [0, 0])) == 0}
    tot_a = tot_b = 0.0
    for index, name in enumerate(names):
        fa, ba = ours["layers"].get(name, [0, 0]) if ours else (0, 0)
        line = f"{name:36s} {fa:7.1f} / {ba:7.1f}" if name not in joined else f"{name:36s} {'(in BatchNorm2d)':>17s}"
        tot_a += fa + ba
        if theirs:
            fb, bb = theirs["layers"].get(name, [0.0, 0.0])
            tot_b += fb + bb
            theirs_total = fb + bb
            if index + 1 < len(names) and names[index + 1] in joined:
                theirs_total += sum(theirs["layers"].get(names[index + 1], [0.0, 0.0]))
            ratio = theirs_total / (fa + ba) if fa + ba > 0.05 else float("nan")
            line += f" {fb:7.1f} / {bb:7.1f} " + (f"{ratio:6.2f}" if name not in joined else "")
        print(line)
    print(f"{'all layers (fwd + bwd)':36s} {tot_a:17.1f}" + (f" {tot_b:17.1f}" if theirs else ""))
    if ours and "mean_step_ms" in ours:  # means over the same steps: a slow step or two moves a median apart
        print(f"{'rest of the step (loss, Adam, ...)':36s} {ours['mean_step_ms'] - tot_a:17.1f}")
    print(f"{'whole step (median)':36s} {step_ms[0]:17.1f}" + (f" {step_ms[1]:17.1f}" if theirs else ""))
    if theirs:
        layout = TORCH_LAYOUTS[TORCH_KINDS[parse_framework(theirs_name)[0]][0]]
        print(f"({ours_name}: each layer timed inside the training step; {theirs_name}: each layer run alone on"
              " an input of its shape, median of the repeats, the first conv without an input gradient as in"
              " the model, so its column does not add up to its step. PyTorch's column is its stronger eager"
              f" configuration, {theirs_name} ({layout}); a torch.compile graph cannot be timed layer by layer)")


def batch_assembly(step_ms, args, framework):
    print("\n== Batch assembly from a uint8 memory-mapped cache (scratchvae.data.Batches) ==")
    try:
        import numpy  # noqa: PLC0415

        from scratchvae import backend  # noqa: PLC0415
        from scratchvae.data import Batches, keep_on_device  # noqa: PLC0415
    except ImportError as e:
        print(f"  skipped: scratchvae.data.Batches is not importable yet ({e})")
        return
    gpu = framework.endswith("gpu")
    xp = backend.set_device("gpu" if gpu else "cpu")
    sync = xp.cuda.Device().synchronize if gpu else (lambda: None)
    n = 4096
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cache.u8")
        mm = numpy.lib.format.open_memmap(path, mode="w+", dtype=numpy.uint8, shape=(n, 3, 64, 64))
        mm[:] = numpy.random.default_rng(0).integers(0, 256, mm.shape, dtype=numpy.uint8)
        mm.flush()
        del mm
        cache = numpy.load(path, mmap_mode="r")
        # on a GPU, training keeps the split on the device when it fits (``keep_on_device``), as here
        sources = [("from the host", cache)] + ([("kept on the GPU", keep_on_device(cache))] if gpu else [])
        for where, images in sources:
            for batch in args.batches:
                batches = Batches(images, batch, shuffle=True, seed=0)
                it = batches.epoch(0)
                next(it)  # warm up
                sync()
                count = min(20, len(batches) - 1)
                t = time.perf_counter()
                for _ in range(count):
                    next(it)
                    sync()
                ms = (time.perf_counter() - t) / count * 1e3
                share = f", {ms / step_ms[batch] * 100:.1f}% of the default model's step ({framework})" \
                    if batch in step_ms else ""
                print(f"  batch {batch:4d}, {where:15s}: {ms:6.2f} ms per batch (shuffled gather + uint8 -> float32)"
                      f"{share}")


def main(argv=None):
    args = parse_args(argv)
    set_thread_env(args.threads)
    if args.worker:
        return worker_main(args)

    print("scratchvae training benchmark" + (" (quick)" if args.quick else ""))
    lines, gpu = environment(args)
    for line in lines:
        print("  " + line)
    devices = [d for d in args.devices if d == "cpu" or gpu]
    if not devices:
        print("  nothing to time: --devices gpu, but no GPU is usable")
        return 1
    use_torch = not args.no_torch and torch_available()
    frameworks = build_frameworks(devices, args.reference, args.torch_configs if use_torch else ())
    if args.no_torch:
        print("  PyTorch: skipped (--no-torch)")
    elif use_torch:
        print("  PyTorch configurations: " + "; ".join(TORCH_DESCRIPTIONS[c] for c in args.torch_configs))
        if "gpu" in devices:
            print("  PyTorch CUDA: TF32 off (cudnn.allow_tf32, matmul.allow_tf32), float32 like CuPy's products")
    else:
        print("  PyTorch: not installed in this environment, so the comparison is skipped "
              "(install torch to compare; it is not a dependency of scratchvae)")

    results, left_out = run_configurations(frameworks, args)

    print_throughput(results, frameworks, args)
    pairs = ratio_pairs(frameworks)
    if pairs:
        print_ratios(results, pairs, args)
    print_strongest(results, frameworks, args, left_out)
    print_compile_times(results)
    print_memory(results)
    print_memory_ratios(results, frameworks, args)
    print_small_steps(results)
    print_issue_times(results)

    stepping = f"scratchvae-{devices[0]}"  # the batch assembly is compared with this framework's step
    step_ms = {b: summarize(results[(stepping, "default", b)], b)[1]
               for b in args.batches if results.get((stepping, "default", b))}
    if not args.no_layers:
        for ours_fw in (f"scratchvae-{d}" for d in devices):
            for preset in args.presets:
                theirs_fw = layer_framework(results, frameworks, parse_framework(ours_fw)[1], preset)
                ours = run_worker(ours_fw, preset, 64, args, layers=True)
                theirs = run_worker(theirs_fw, preset, 64, args, layers=True) if theirs_fw else None
                if ours:
                    steps = (summarize(ours, 64)[1], summarize(theirs, 64)[1] if theirs else 0.0)
                    print_layers(ours, theirs, ours_fw, theirs_fw, steps, preset)
    batch_assembly(step_ms, args, stepping)
    print(f"\n  {load()} (after)")


if __name__ == "__main__":
    sys.exit(main())
