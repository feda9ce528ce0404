"""CuPy's ``ElementwiseKernel`` and ``ReductionKernel`` for the stand-in device: the same CUDA C, run on the CPU.

The package's GPU path fuses some layers into user-defined kernels whose bodies are CUDA C (``scratchvae.fast.kernels``).
Without a GPU those bodies would go unchecked; here each is compiled with the host's C++ compiler into a plain
loop over the elements and run on the stand-in's arrays, so that the tests compare its numbers with the NumPy
path's. What this emulates of CuPy's rules (from its documentation of the two classes):

* parameters are ``"type name"`` lists; a type that is not a NumPy dtype name (``T``) is a placeholder, taken
  from the dtype of the array arguments bound to it (all must agree), and Python scalars bound to it are cast;
* array arguments broadcast against each other; output arrays, when passed, must have the broadcast shape
  (outputs not passed are allocated, filled here with NaN so that a body that reads them before writing shows);
* in the body, input parameters are read-only values, output parameters are references to their element (a body
  may read an output before writing it, as ``dgamma += ...`` does); ``i`` is the element's index;
* a ``raw`` input takes no part in broadcasting and is read as ``name[k]``, k the element's index in the C order
  of the array's own shape, whatever its strides (CuPy's ``CArray::operator[]``);
* a reduction maps each input element with ``map_expr``, folds the mapped values with ``reduce_expr`` (in ``a``
  and ``b``) from ``identity``, in the ``reduce_type``, and writes each output with ``post_map_expr`` (in ``a``),
  over the axes given by ``axis``.

Stricter than CuPy where that is cheap: host (NumPy) arrays are refused, and an array whose dtype differs from its
parameter's declared type is an error rather than a cast; a read of a ``raw`` input outside the array raises
``IndexError`` (on a GPU it reads whatever lies there). Raw outputs, and raw inputs of reductions, are not supported.
The elements run one after the other; CuPy's order of summation differs, which the tests' tolerances allow for.
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import unittest

import numpy

C_TYPES = {"float32": ("float", ctypes.c_float), "float64": ("double", ctypes.c_double),
           "int32": ("int", ctypes.c_int32), "int64": ("long long", ctypes.c_int64)}
COMPILER = shutil.which("g++") or shutil.which("c++")
_loaded = {}  # source hash -> ctypes function


def _parse(params, raw_allowed=False):
    """'T x, raw T w, float64 m' -> [(type, name, raw)]."""
    out = []
    for item in params.split(","):
        words = item.split()
        if not words:
            continue
        raw = words[0] == "raw"
        if raw:
            if not raw_allowed:
                raise NotImplementedError(f"the stand-in kernels take raw inputs of elementwise kernels only, got {item!r}")
            words = words[1:]
        if len(words) != 2:
            raise NotImplementedError(f"the stand-in kernels take '[raw] type name' parameters only, got {item!r}")
        if not re.fullmatch(r"[A-Za-z_]\w*", words[1]) or words[1] == "i" or words[1].startswith("_"):
            raise ValueError(f"bad parameter name {words[1]!r} (CuPy reserves i and names starting with _)")
        out.append((words[0], words[1], raw))
    return out


def _compile(source, name):
    """The function ``run`` of ``source``, compiled once per source text (cached on disk across processes)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    if key in _loaded:
        return _loaded[key]
    if COMPILER is None:
        raise unittest.SkipTest("no C++ compiler (g++) to run the GPU path's CUDA kernels on the stand-in device")
    cache = os.path.join(tempfile.gettempdir(), f"scratchvae-standin-kernels-{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    lib = os.path.join(cache, f"{name}-{key}.so")
    if not os.path.exists(lib):
        src = os.path.join(cache, f"{name}-{key}-{os.getpid()}.cpp")
        with open(src, "w") as f:
            f.write(source)
        tmp = f"{lib}.{os.getpid()}"
        done = subprocess.run([COMPILER, "-O1", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-o", tmp, src],
                              capture_output=True, text=True)
        os.remove(src)
        if done.returncode != 0:
            raise RuntimeError(f"kernel {name!r} does not compile:\n{done.stderr}\n--- source ---\n{source}")
        os.replace(tmp, lib)
    _loaded[key] = ctypes.CDLL(lib).run
    return _loaded[key]


# a raw input: read by index, each index checked (a read outside the array is counted, and gives 0)
_RAW = """template <typename T> struct _Raw {
  const T* p; long long n; int* outside;
  T operator[](long long k) const { if (k < 0 || k >= n) { ++*outside; return T(0); } return p[k]; }
};
"""


class _Kernel:
    def __init__(self, in_params, out_params, name, options, raw_allowed=False):
        # NVRTC's --fmad=false is what -ffp-contract=off does here; nothing else is emulated
        if set(options) - {"options"} or options.get("options", ("--fmad=false",)) != ("--fmad=false",):
            raise NotImplementedError(f"the stand-in kernels take no options but --fmad=false, got {options}")
        self.ins, self.outs, self.name = _parse(in_params, raw_allowed), _parse(out_params), name

    def _bind(self, args):
        """Check the arguments against the parameters; resolve placeholders; -> (types, broadcast shape)."""
        from strict_device import DeviceArray, HostDeviceMixError  # noqa: PLC0415

        if len(args) not in (len(self.ins), len(self.ins) + len(self.outs)):
            raise TypeError(f"kernel {self.name} takes {len(self.ins)} inputs (and optionally {len(self.outs)} outputs), "
                            f"got {len(args)} arguments")
        types, shapes = {}, []
        for (typ, name, raw), a in zip(self.ins + self.outs, args):
            if isinstance(a, numpy.ndarray) and not isinstance(a, DeviceArray):
                raise HostDeviceMixError(f"kernel {self.name}: argument {name} is a host numpy array")
            if isinstance(a, numpy.ndarray):
                dtype = a.dtype.name
                if typ in C_TYPES and dtype != typ:
                    raise TypeError(f"kernel {self.name}: {name} is declared {typ} but the array is {dtype}")
                if typ not in C_TYPES and types.setdefault(typ, dtype) != dtype:
                    raise TypeError(f"kernel {self.name}: type {typ} is both {types[typ]} and {dtype} ({name})")
                if not raw:
                    shapes.append(a.shape)
            elif not isinstance(a, (int, float)):
                raise TypeError(f"kernel {self.name}: argument {name} is a {type(a).__name__}")
        for typ, name, _ in self.ins + self.outs:
            if typ not in C_TYPES and typ not in types:
                raise TypeError(f"kernel {self.name}: no array argument fixes the type {typ} (of {name})")
        return {**{k: k for k in C_TYPES}, **types}, numpy.broadcast_shapes(*shapes)

    def _signature(self, types, args):
        """The C parameter list, and the ctypes values for it, of inputs (arrays as pointers, scalars by value; a raw
        array also with its size)."""
        decls, values = [], []
        for (typ, name, raw), a in zip(self.ins, args):
            ctype, cscalar = C_TYPES[types[typ]]
            if isinstance(a, numpy.ndarray):
                decls.append(f"const {ctype}* _p_{name}")
                values.append(ctypes.c_void_p(a.ctypes.data))
                if raw:
                    decls.append(f"long long _n_{name}")
                    values.append(ctypes.c_longlong(a.size))
            else:
                decls.append(f"const {ctype} {name}")
                values.append(cscalar(a))
        return decls, values

    def _prelude(self, types):
        return "#include <cmath>\n#include <cstdint>\nusing std::sqrt; using std::exp; using std::log;\n" + _RAW + "".join(
            f"typedef {C_TYPES[dtype][0]} {placeholder};\n" for placeholder, dtype in types.items() if placeholder not in C_TYPES)

    @staticmethod
    def _device(a):
        from strict_device import _wrap  # noqa: PLC0415

        return _wrap(a)


class ElementwiseKernel(_Kernel):
    """``cupy.ElementwiseKernel(in_params, out_params, operation, name)``, run on the CPU (see the module docstring)."""

    def __init__(self, in_params, out_params, operation, name="kernel", **options):
        super().__init__(in_params, out_params, name, options, raw_allowed=True)
        self.operation = operation

    def __call__(self, *args):
        types, shape = self._bind(args)
        ins = []
        for (_, _, raw), a in zip(self.ins, args[:len(self.ins)]):
            if isinstance(a, numpy.ndarray):  # a raw array keeps its shape; its C-order copy is what raw[k] reads
                a = numpy.ascontiguousarray(a.view(numpy.ndarray) if raw else numpy.broadcast_to(a.view(numpy.ndarray), shape))
            ins.append(a)
        outs = list(args[len(self.ins):])
        for (typ, name, _), out in zip(self.outs, outs):
            if out.shape != shape:
                raise ValueError(f"kernel {self.name}: output {name} has shape {out.shape}, the arguments broadcast to {shape}")
        for typ, name, _ in self.outs[len(outs):]:
            outs.append(self._device(numpy.full(shape, numpy.nan, dtype=types[typ])))
        work = [numpy.ascontiguousarray(out.view(numpy.ndarray)) for out in outs]  # a copy only if strided
        decls, values = self._signature(types, ins)
        raws = [f"  const _Raw<{C_TYPES[types[t]][0]}> {n}{{_p_{n}, _n_{n}, &_outside}};\n"
                for (t, n, raw), a in zip(self.ins, ins) if raw and isinstance(a, numpy.ndarray)]
        loads = [f"    const {C_TYPES[types[t]][0]} {n} = _p_{n}[i];\n" for (t, n, raw), a in zip(self.ins, ins)
                 if isinstance(a, numpy.ndarray) and not raw]
        for (typ, name, _), w in zip(self.outs, work):
            decls.append(f"{C_TYPES[types[typ]][0]}* _p_{name}")
            values.append(ctypes.c_void_p(w.ctypes.data))
            loads.append(f"    {C_TYPES[types[typ]][0]} &{name} = _p_{name}[i];\n")
        source = (self._prelude(types) + f'extern "C" int run(long long _n, {", ".join(decls)}) {{\n'
                  f"  int _outside = 0;\n{''.join(raws)}"
                  f"  for (long long i = 0; i < _n; ++i) {{\n{''.join(loads)}    {{ {self.operation}; }}\n  }}\n"
                  f"  return _outside;\n}}\n")
        outside = _compile(source, self.name)(ctypes.c_longlong(int(numpy.prod(shape))), *values)
        if outside:
            raise IndexError(f"kernel {self.name}: {outside} reads of a raw input outside its array")
        for out, w in zip(outs, work):
            if not numpy.shares_memory(w, out.view(numpy.ndarray)):
                out.view(numpy.ndarray)[...] = w
        return outs[0] if len(outs) == 1 else tuple(outs)


class ReductionKernel(_Kernel):
    """``cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name,
    reduce_type)``, run on the CPU (see the module docstring); called with ``axis`` (default: all axes)."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name="reduce_kernel",
                 reduce_type=None, **options):
        super().__init__(in_params, out_params, name, options)
        if len(self.outs) != 1:
            raise NotImplementedError("the stand-in reductions have one output")
        if reduce_type is None:
            raise NotImplementedError("the stand-in reductions need an explicit reduce_type")
        self.map_expr, self.reduce_expr, self.post_map_expr = map_expr, reduce_expr, post_map_expr
        self.identity, self.reduce_type = identity, reduce_type

    def __call__(self, *args, axis=None):
        if len(args) != len(self.ins):
            raise NotImplementedError("the stand-in reductions allocate their output")
        types, shape = self._bind(args)
        axes = tuple(range(len(shape))) if axis is None else tuple(a % len(shape) for a in numpy.atleast_1d(axis))
        kept = tuple(a for a in range(len(shape)) if a not in axes)
        order = kept + axes  # reduced axes last, so that each output reads one contiguous run

        def moved(a):
            return numpy.ascontiguousarray(numpy.broadcast_to(a.view(numpy.ndarray), shape).transpose(order))
        ins = [moved(a) if isinstance(a, numpy.ndarray) else a for a in args]
        out_shape = tuple(shape[a] for a in kept)
        n_out = int(numpy.prod(out_shape))
        out = numpy.full(out_shape, numpy.nan, dtype=types[self.outs[0][0]])
        decls, values = self._signature(types, ins)
        loads = "".join(f"      const {C_TYPES[types[t]][0]} {n} = _p_{n}[_j];\n" for (t, n, _), a in zip(self.ins, ins)
                        if isinstance(a, numpy.ndarray))
        out_type, out_name = C_TYPES[types[self.outs[0][0]]][0], self.outs[0][1]
        red = self.reduce_type  # pasted in as it is, as CuPy does: a C type, or a placeholder the prelude typedefs
        source = (self._prelude(types) + f'extern "C" void run(long long _n_out, long long _n_red, {", ".join(decls)}, '
                  f"{out_type}* _p_{out_name}) {{\n  for (long long _o = 0; _o < _n_out; ++_o) {{\n"
                  f"    {red} _s = ({red})({self.identity});\n"
                  f"    for (long long _r = 0; _r < _n_red; ++_r) {{\n      const long long _j = _o * _n_red + _r;\n{loads}"
                  f"      const {red} _m = ({red})({self.map_expr});\n"
                  f"      {{ const {red} a = _s, b = _m; _s = ({self.reduce_expr}); }}\n    }}\n"
                  f"    {out_type} &{out_name} = _p_{out_name}[_o];\n"
                  f"    {{ const {red} a = _s; {self.post_map_expr}; }}\n  }}\n}}\n")
        n_red = int(numpy.prod([shape[a] for a in axes]))
        _compile(source, self.name)(ctypes.c_longlong(n_out), ctypes.c_longlong(n_red), *values, ctypes.c_void_p(out.ctypes.data))
        return self._device(out)
