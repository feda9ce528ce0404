"""A stand-in for CuPy on machines without a GPU: NumPy arrays that refuse to mix with host arrays.

CuPy raises when an operation combines a device array with a NumPy array; NumPy silently accepts it.
``DeviceArray`` is an ndarray subclass whose ufuncs and array functions raise ``HostDeviceMixError`` when
any operand is a plain (host) ndarray, and whose results stay DeviceArrays. ``StrictModule`` plays the
``cupy`` module: its constructors return DeviceArrays. With ``use_strict_device()`` installed as the
backend's device, code that would break on CuPy breaks here too.
"""
import contextlib
import types

import numpy
import standin_kernels

from scratchvae import backend


class HostDeviceMixError(TypeError):
    """An operation combined a device array with a host (NumPy) array."""


def _is_host(a):
    return isinstance(a, numpy.ndarray) and not isinstance(a, DeviceArray)


def _check(items, what):
    for a in items:
        if isinstance(a, (list, tuple)):
            _check(a, what)
        elif _is_host(a):
            raise HostDeviceMixError(f"{what} mixes a device array with a host numpy array of shape {a.shape}")


def _unwrap(a):
    if isinstance(a, DeviceArray):
        return a.view(numpy.ndarray)
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(v) for v in a)
    return a


def _wrap(a):
    if isinstance(a, numpy.generic):  # a full reduction gives NumPy a scalar, CuPy a 0-d device array
        a = numpy.asarray(a)
    if isinstance(a, numpy.ndarray) and not isinstance(a, DeviceArray):
        return a.view(DeviceArray)
    if isinstance(a, tuple):
        return tuple(_wrap(v) for v in a)
    return a


class DeviceArray(numpy.ndarray):
    """An ndarray that behaves like a CuPy array: no implicit mixing with host arrays."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _check(inputs, f"ufunc {ufunc.__name__}")
        if out is not None:
            _check(out, f"ufunc {ufunc.__name__} (out=)")
            kwargs["out"] = _unwrap(out)
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        _check(args, f"numpy.{func.__name__}")
        _check(list(kwargs.values()), f"numpy.{func.__name__}")
        return _wrap(func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))

    def __getitem__(self, key):
        # an index array from the host: CuPy copies it over at every call, unasked; here that is refused
        _check(list(key) if isinstance(key, tuple) else [key], "indexing")
        return _wrap(super().__getitem__(key))  # an element is a 0-d device array, as on CuPy, not a NumPy scalar

    def __setitem__(self, key, value):
        _check([value], "assignment")
        super().__setitem__(key, _unwrap(value))

    def get(self):
        """Like cupy.ndarray.get(): a host copy."""
        HOST_READS.append("get")
        return numpy.array(self.view(numpy.ndarray), copy=True)


HOST_READS = []  # every read of device values by the host (get, bool, float, int, index, item, tolist), in order


def _noted(name, method):
    def read(self, *args):
        HOST_READS.append(name)
        return method(self, *args)
    return read


# On CuPy these read a value back to the host too, waiting for the GPU to finish everything queued before
# it: each is noted in HOST_READS, so that tests can count a training step's waits.
for _name, _method in (("bool", "__bool__"), ("float", "__float__"), ("int", "__int__"), ("index", "__index__"),
                       ("item", "item"), ("tolist", "tolist")):
    setattr(DeviceArray, _method, _noted(_name, getattr(numpy.ndarray, _method)))


class _StrictGenerator:
    def __init__(self, seed, bit_generator="XORWOW"):
        self._rng = numpy.random.default_rng(seed)
        self.bit_generator_name = bit_generator  # which of CuPy's the code asked for (NumPy's draws either way)

    def __deepcopy__(self, memo):  # CuPy's generators hold a lock, and copying one raises this
        raise TypeError("cannot pickle '_thread.lock' object")

    def __getattr__(self, name):
        method = getattr(self._rng, name)
        return lambda *a, **k: _wrap(numpy.asarray(method(*a, **k)))


def _constructor(fn):
    def make(*args, **kwargs):
        _check(args[1:], fn.__name__)
        return _wrap(numpy.asarray(fn(*_unwrap(args), **_unwrap(kwargs))))
    return make


def make_strict_module():
    """A module object that plays ``cupy``: numpy's namespace, with constructors returning DeviceArrays."""
    mod = types.ModuleType("strict_device")
    for name in dir(numpy):
        if not name.startswith("__"):
            setattr(mod, name, getattr(numpy, name))
    for name in ("asarray", "array", "ascontiguousarray", "zeros", "ones", "empty", "full", "arange",
                 "linspace", "eye", "zeros_like", "ones_like", "empty_like", "full_like"):
        setattr(mod, name, _constructor(getattr(numpy, name)))
    # CuPy's Generator around a bit generator (default_rng: XORWOW); here NumPy's seeded with the same number
    mod.random = types.SimpleNamespace(default_rng=_StrictGenerator,
                                       Generator=lambda bits: _StrictGenerator(*bits),
                                       Philox4x3210=lambda seed: (seed, "Philox4x3210"))
    mod.ElementwiseKernel, mod.ReductionKernel = standin_kernels.ElementwiseKernel, standin_kernels.ReductionKernel
    return mod


@contextlib.contextmanager
def use_strict_device():
    """Make the strict module the backend's device for the duration of the block."""
    saved = backend._state["xp"]
    backend.EXTRA_DEVICE_TYPES.append(DeviceArray)
    backend._state["xp"] = make_strict_module()
    try:
        yield backend._state["xp"]
    finally:
        backend._state["xp"] = saved
        backend.EXTRA_DEVICE_TYPES.remove(DeviceArray)
