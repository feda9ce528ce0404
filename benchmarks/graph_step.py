"""An experiment for a GPU machine: a training step's forward and backward captured once as a CUDA graph, then
replayed, against the step as the package runs it. It changes nothing in the package.

    python benchmarks/graph_step.py                      # default model, batch 128
    python benchmarks/graph_step.py --preset small --batch 64 --steps 30

Why: on a GPU the package's training step issues some 260 kernel launches (``count_ops.py``), and CuPy spends
microseconds of Python on each; where queueing them takes longer than the GPU needs to run them (the
benchmark's "queued in ... ms, done after ... ms"), the GPU waits on the host. A CUDA graph is the launches of
one forward and backward recorded once, with their arguments and memory, and replayed with one call.

What it does: copies the batch and the noise into fixed arrays, records ``forward_backward`` on those arrays
(on a stream of its own; what it allocates while recording comes from a memory pool of its own, which nothing
else allocates from), and then, per step, copies the new batch and noise in, replays the graph, reads the
logged scalars, and runs Adam (whose step count changes each step, so it stays outside). The graph also
writes into arrays made before it (parameters, gradients, BatchNorm's statistics, every layer's work arrays):
references to all of them are kept for as long as the graph lives, so that none can be freed and handed out
again while a replay still writes into it. It first checks that a replay gives the numbers of the package's
own forward and backward on the same batch and noise (loss, each parameter's gradient, BatchNorm's running
statistics), then times both ways.

Result on an H200 with CuPy 14.2 (2026-11-26): it cannot run. CuPy refuses any cuBLAS call while a stream is
being captured ("calling cuBLAS API during stream capture is currently unsupported"; its ``cublas.setStream``
raises), and every matrix product of the step is a cuBLAS call. cuBLAS itself can be captured (PyTorch does),
so the experiment stays, and says so when CuPy refuses.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import time_steps  # noqa: E402

from scratchvae import backend  # noqa: E402
from scratchvae.backend import array_module  # noqa: E402
from scratchvae.fast.workspace import flat_parameters  # noqa: E402
from scratchvae.vae import VAE  # noqa: E402


KEEP_ALIVE = []  # what the graphs made here use, for as long as the process lives


def capture(xp, fn):
    """Run ``fn`` once on a stream of its own to warm it up (kernels compiled, work arrays made), then once more
    under stream capture: ``(graph, fn's result from the captured run)``. Memory comes from a private pool."""
    pool, stream = xp.cuda.MemoryPool(), xp.cuda.Stream(non_blocking=True)
    xp.cuda.Device().synchronize()  # what the null stream wrote (parameters, inputs) is done before we read it
    with xp.cuda.using_allocator(pool.malloc), stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        try:
            result = fn()
        except BaseException:
            with contextlib.suppress(Exception):  # end the broken capture, but report what broke it
                stream.end_capture()
            raise
        graph = stream.end_capture()
    KEEP_ALIVE.append((pool, stream))  # the graph's memory is the pool's: it must outlive the graph
    return graph, result


class GraphStep:
    """``train_step`` with forward and backward replayed from a CUDA graph (GPU only; fixed batch size)."""

    def __init__(self, model, optimizer, x_shape):
        self.model, self.optimizer = model, optimizer
        self.xp = xp = backend.get_xp()
        dtype = backend.get_default_dtype()
        # the graph reads these two arrays, whose addresses it keeps: each step copies its batch and noise in
        self.x = x = xp.zeros(x_shape, dtype=dtype)
        self.eps = eps = xp.zeros((model.mc_samples, x_shape[0], model.latent_dim), dtype=dtype)
        model.train()

        saved = model.snapshot_buffers()  # the two runs in ``capture`` (on zeros) must not move the statistics
        self.graph, self.scalars = capture(xp, lambda: gradients(model, x, eps))
        model.restore_buffers(saved)
        # every array made before the graph that it writes into or reads, kept alive with it (see above)
        KEEP_ALIVE.append((model.__dict__.get("_flat"), [dict(m.__dict__.get("_work", {})) for _, m in model.named_modules()]))

    def forward_backward(self, x, eps):
        """The replay: gradients in the model's, the step's (loss, recon, kl) as a device array."""
        self.x[...] = x
        self.eps[...] = eps
        self.graph.launch(stream=self.xp.cuda.Stream.null)  # ordered with everything else on the null stream
        return self.scalars

    def __call__(self, x, eps):
        """One update, as ``VAE.train_step`` makes it (a NaN loss leaves parameters and statistics untouched)."""
        saved = self.model.snapshot_buffers()
        loss, recon, kl = (float(v) for v in backend.to_host(self.forward_backward(x, eps)))
        if not all(math.isfinite(v) for v in (loss, recon, kl)):
            self.model.restore_buffers(saved)
            raise FloatingPointError(f"non-finite loss {loss}")
        self.optimizer.step()
        return {"loss": loss, "recon": recon, "kl": kl}


def gradients(model, x, eps):
    """The package's forward and backward as ``train_step`` runs them (gradients zeroed first, layers writing
    over their previous outputs): the gradients in the model's, ``(loss, recon, kl)`` as one device array."""
    model.zero_grad()
    loss, recon, kl = model.forward_backward(x, eps=eps)
    return array_module(loss).stack([loss, recon.mean(), kl.mean()])


def state(model):
    """Host copies of each parameter's gradient, and of every buffer, by name."""
    grads = {name: backend.to_host(g).copy() for name, _, g in model.named_parameters()}
    return grads, {name: backend.to_host(b).copy() for name, b in model.named_buffers()}


def check(model, graph_step, x, eps):
    """Largest relative differences between a replay and the package's own forward + backward, same inputs
    (for the gradients and the statistics, the worst array's, each relative to its own largest value)."""
    saved = model.snapshot_buffers()
    eager = backend.to_host(gradients(model, x, eps))
    eager_g, eager_b = state(model)
    model.restore_buffers(saved)
    # poisoned, so that a replay that runs nothing cannot pass (one that runs part of the step leaves numbers
    # unlike the package's, which the comparison below sees)
    flat_parameters(model)[1][...] = math.nan
    graph_step.scalars[...] = math.nan
    replay = backend.to_host(graph_step.forward_backward(x, eps))
    replay_g, replay_b = state(model)
    model.restore_buffers(saved)

    def rel(a, b):
        d = numpy.abs(a - b).max() / max(numpy.abs(a).max(), 1e-30)
        return float(d) if numpy.isfinite(d) else math.inf
    return {"loss, recon, kl": rel(eager, replay),
            "gradients": max(rel(eager_g[k], replay_g[k]) for k in eager_g),
            "running statistics": max(rel(eager_b[k], replay_b[k]) for k in eager_b)}


def timed(step, steps, sync):
    """The median wall time of ``steps`` runs of ``step``, in ms, each waited for (``bench_train.time_steps``)."""
    times = time_steps(step, 0, steps, sync)
    return times[len(times) // 2] * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    xp = backend.set_device("gpu")
    model = VAE(image_size=64, preset=args.preset)
    optimizer = model.make_optimizer(lr=1e-3)
    rng = numpy.random.default_rng(0)
    x = backend.to_device(rng.integers(0, 256, (args.batch, 3, 64, 64), dtype=numpy.uint8), numpy.float32) / 255
    eps = model.draw_eps(args.batch, backend.rng(1))
    sync = xp.cuda.Device().synchronize
    for _ in range(2):  # the package's own step first: kernels compiled, work arrays made
        model.train_step(x, optimizer, eps=eps)
    try:
        graph_step = GraphStep(model, optimizer, x.shape)
    except NotImplementedError as e:  # CuPy's refusal to capture cuBLAS (see the module docstring)
        if "stream capture" not in str(e):
            raise
        print(f"CuPy {xp.__version__} cannot capture this step as a CUDA graph: {e}")
        return 0
    differences = check(model, graph_step, x, eps)
    print(f"{args.preset} model, batch {args.batch}: a replay against the package's forward + backward, largest "
          "relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
    eager_ms = timed(lambda: model.train_step(x, optimizer, eps=eps), args.steps, sync)
    graph_ms = timed(lambda: graph_step(x, eps), args.steps, sync)
    print(f"  training step: {eager_ms:.2f} ms as the package runs it, {graph_ms:.2f} ms with forward + backward "
          f"replayed from a CUDA graph ({eager_ms / graph_ms:.2f}x)")
    return 0 if max(differences.values()) < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
