"""benchmarks/graph_step.py's own logic (static inputs, the replay, the check against the package's numbers), on the
stand-in device with a stand-in for CUDA graph capture: a "graph" that runs the captured function again into the
captured result, as a replay writes into the arrays the capture saw. CUDA's capture itself needs a GPU."""
import importlib.util
import types
from pathlib import Path

import numpy

from scratchvae import backend
from scratchvae.fast.workspace import flat_parameters
from scratchvae.vae import VAE
from strict_device import use_strict_device

_spec = importlib.util.spec_from_file_location(
    "graph_step", Path(__file__).resolve().parents[1] / "benchmarks" / "graph_step.py")
graph_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_step)


class Replay:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def launch(self, stream=None):
        self.out[...] = self.fn()


def fake_capture(xp, fn):
    fn()  # the warm-up run
    out = fn()
    return Replay(fn, out), out


def test_a_replay_is_checked_against_the_packages_forward_and_backward(monkeypatch):
    monkeypatch.setattr(graph_step, "capture", fake_capture)
    with use_strict_device() as strict:
        strict.cuda = types.SimpleNamespace(Stream=types.SimpleNamespace(null=None))
        model = VAE(image_size=16, preset="tiny")
        optimizer = model.make_optimizer(lr=1e-3)
        x = backend.to_device(numpy.random.default_rng(0).random((4, 3, 16, 16)), numpy.float32)
        eps = model.draw_eps(4, backend.rng(1))
        model.train_step(x, optimizer, eps=eps)
        statistics = backend.to_host(model.snapshot_buffers())
        step = graph_step.GraphStep(model, optimizer, x.shape)
        numpy.testing.assert_array_equal(backend.to_host(model.snapshot_buffers()), statistics)  # (runs on zeros)
        assert max(graph_step.check(model, step, x, eps).values()) == 0  # same inputs, same numbers
        before = backend.to_host(flat_parameters(model)[0]).copy()
        logs = step(x, eps)
        assert numpy.isfinite(logs["loss"]) and not numpy.array_equal(before, backend.to_host(flat_parameters(model)[0]))
        # a replay that reads the arrays it was captured with, while the batch went elsewhere: the check sees it
        monkeypatch.setattr(step, "x", strict.zeros_like(step.x))
        assert graph_step.check(model, step, 1 - x, eps)["gradients"] > 1e-3
        # a replay that writes nothing (the gradients are poisoned first): the check sees it
        monkeypatch.setattr(step, "graph", types.SimpleNamespace(launch=lambda stream=None: None))
        assert graph_step.check(model, step, x, eps)["gradients"] == numpy.inf
