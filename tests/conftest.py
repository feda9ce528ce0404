"""Shared fixtures: every test that takes ``xp`` runs on NumPy, and again on CuPy where a GPU is usable."""
import numpy
import pytest

from scratchvae import backend


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def xp(request):
    """The array module of the device under test; the GPU run skips cleanly without CuPy and a GPU."""
    if request.param == "gpu" and not backend.gpu_available():
        pytest.skip("no usable GPU/CuPy")
    saved = backend._state["xp"]
    module = backend.set_device(request.param)
    yield module
    backend._state["xp"] = saved


@pytest.fixture
def f64():
    """Build layers and models in float64 for the duration of a test (gradient checks)."""
    with backend.default_dtype(numpy.float64):
        yield numpy.float64


@pytest.fixture(params=["reference", "fast"])
def engine(request):
    """Each engine in turn: the textbook layers, and the fast ones tested equal to them."""
    return request.param


@pytest.fixture(autouse=True)
def restore_device():
    """Whatever a test does to the backend's device (the CLI and ``train`` choose one), the next test finds it back."""
    saved = backend._state["xp"]
    yield
    backend._state["xp"] = saved
