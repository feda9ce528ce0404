"""CPU/GPU hygiene, checked on NumPy alone.

On CuPy, a compute module that calls NumPy on a device array fails (or silently copies to the host),
and so does mixing host and device arrays. CI has no GPU, so we check the source instead: the compute
modules may reach arrays only through ``xp`` (from ``backend``), never by importing NumPy or CuPy, and
only ``backend`` may import CuPy. The checker is tested on planted violations, so it cannot rot silently.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scratchvae"
# modules whose functions run inside the training step on device arrays
COMPUTE_MODULES = ["layers.py", "vae.py", "optim.py", "fast/activations.py", "fast/conv.py", "fast/layers.py",
                   "fast/norm.py", "fast/optim.py", "fast/vae.py", "fast/workspace.py"]
ARRAY_LIBS = {"numpy", "cupy"}


def violations(source, filename="<source>", allow_numpy=False):
    """Lines of ``source`` that import or use NumPy/CuPy directly (NumPy allowed if ``allow_numpy``)."""
    banned = {"cupy"} if allow_numpy else set(ARRAY_LIBS)
    found, aliases = [], set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in banned:
                    found.append(f"{filename}:{node.lineno}: import {alias.name}")
                    aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in banned:
            found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Name) and node.id in (aliases | ({"np"} if not allow_numpy else set())):
            found.append(f"{filename}:{node.lineno}: uses {node.id}")
    return found


@pytest.mark.parametrize("name", COMPUTE_MODULES)
def test_compute_modules_use_only_xp(name):
    path = PACKAGE / name
    if not path.exists():
        pytest.skip(f"{name} not written yet")
    assert violations(path.read_text(), name) == []


def test_only_backend_imports_cupy():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "backend.py":
            assert violations(path.read_text(), path.name, allow_numpy=True) == [], path


@pytest.mark.parametrize("planted", [
    "import numpy as np\ndef f(x):\n    return np.exp(x)\n",
    "import numpy\ndef f(x):\n    return numpy.asarray(x) + x\n",
    "from numpy import exp\ndef f(x):\n    return exp(x)\n",
    "def f(x):\n    return np.zeros(3) + x\n",  # a stray np with the import elsewhere
    "import cupy\ndef f(x):\n    return cupy.asnumpy(x)\n",
])
def test_checker_catches_planted_violations(planted):
    assert violations(planted) != []


def test_checker_accepts_xp_code():
    clean = ("from .backend import array_module\n"
             "def f(x):\n    xp = array_module(x)\n    return xp.exp(x) + xp.zeros_like(x)\n")
    assert violations(clean) == []


# ---- the reference engine stays the textbook a learner reads ---------------------------------------------

FAST_MACHINERY = ["is_device_array", "kernels", "work_array", "output_array", "recycl", "pieces", "flat_param"]


def test_the_reference_layers_hold_no_fast_engine_machinery():
    """No device branch, kernel, work array, recycled output, piece loop or flat parameter in ``layers.py``."""
    source = (PACKAGE / "layers.py").read_text()
    assert [word for word in FAST_MACHINERY if word in source] == []


def test_the_reference_layers_keep_to_their_reading_budgets():
    """The learner's file and its longest paths stay short enough to read in one sitting (issue 19's budgets)."""
    source = (PACKAGE / "layers.py").read_text()
    spans = {node.name: node.end_lineno - node.lineno + 1 for node in ast.parse(source).body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert len(source.splitlines()) <= 515
    assert spans["Conv2d"] + spans["im2col"] + spans["col2im"] + spans["conv_output_size"] <= 100, spans
    assert spans["BatchNorm2d"] <= 60, spans


# ---- the strict stand-in device: host/device mixing fails on NumPy as it would on CuPy ------------------

from strict_device import HostDeviceMixError, use_strict_device  # noqa: E402

from scratchvae import backend  # noqa: E402


def test_strict_device_catches_planted_mixing():
    import numpy
    with use_strict_device() as xp:
        a = xp.ones((2, 3))
        assert backend.is_device_array(a) and backend.is_device_array(a * 2 + xp.exp(a))
        with pytest.raises(HostDeviceMixError):
            a + numpy.ones(3)  # a host array slipped into device code
        with pytest.raises(HostDeviceMixError):
            numpy.concatenate([a, numpy.zeros((1, 3))])
        with pytest.raises(HostDeviceMixError):
            a[0] = numpy.arange(3.0)
        assert isinstance(backend.to_host(a), numpy.ndarray) and not backend.is_device_array(backend.to_host(a))


def test_training_step_and_model_api_keep_to_the_device(engine):
    """The whole step (layers, VAE, Adam) and the model's helpers never touch a host array, on either engine."""
    from scratchvae.optim import Adam
    from scratchvae.vae import VAE
    with use_strict_device():
        for kw in ({}, {"recon": "bce", "mc_samples": 2}, {"objective": "prior-mc", "mc_samples": 2}):
            model = VAE(image_size=16, preset="tiny", engine=engine, **kw)
            x = backend.to_device(backend.rng(0).random((4, 3, 16, 16)), backend.get_default_dtype())
            assert backend.is_device_array(x)
            logs = model.train_step(x, model.make_optimizer(), rng=backend.rng((0, 1)))
            assert set(logs) == {"loss", "recon", "kl"} and all(isinstance(v, float) for v in logs.values())
            assert all(backend.is_device_array(p) for _, p, _ in model.named_parameters())
            assert backend.is_device_array(model.sample(2)) and backend.is_device_array(model.reconstruct(x))
            assert isinstance(model.evaluate(x)["neg_elbo_nats"], float)
        with pytest.raises(HostDeviceMixError):
            model.train_step(backend.to_host(x), Adam(model))  # a batch left on the host


@pytest.mark.parametrize("kw", [{}, {"recon": "bce", "mc_samples": 2}, {"objective": "prior-mc", "mc_samples": 2}])
def test_a_training_step_reads_from_the_device_once(kw, engine):
    """On a GPU every read of a device value by the host waits for the GPU: a training step makes one, for
    its logged scalars, all three together (and no hidden one: no if on a device array, no float() of one)."""
    import strict_device
    from scratchvae.vae import VAE
    with use_strict_device():
        model = VAE(image_size=16, preset="tiny", engine=engine, **kw)
        optimizer = model.make_optimizer()
        x = backend.to_device(backend.rng(0).random((4, 3, 16, 16)), backend.get_default_dtype())
        model.train_step(x, optimizer, rng=backend.rng((0, 1)))  # the first step makes the work arrays
        del strict_device.HOST_READS[:]
        for step in range(2):
            model.train_step(x, optimizer, rng=backend.rng((0, 2 + step)))
        assert strict_device.HOST_READS == ["get", "get"]
        del strict_device.HOST_READS[:]
        float(x[0, 0, 0, 0])  # the stand-in does note such a read
        assert strict_device.HOST_READS == ["float"]
