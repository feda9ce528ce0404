"""Do the GPU path's kernels compile with the real CUDA toolchain? A check for machines without a GPU.

    python tests/compile_kernels_nvcc.py          # needs CuPy importable (no GPU) and nvcc on PATH

The tests run ``scratchvae.fast.kernels`` on the stand-in device, which compiles each body as C++ with g++; this
script compiles them as CUDA, the way CuPy would: each ``ElementwiseKernel``'s source comes from CuPy's own
code generator (``cupy._core._kernel._get_elementwise_kernel_code``, with the argument descriptions CuPy
would make for the arrays and scalars the layers pass), each ``ReductionKernel``'s from a copy of CuPy's
template reduced to one thread block; both with CuPy's headers, for sm_90, with the kernels' options
(``--fmad=false``), in float32 and float64. It also checks that no fused multiply-add was emitted.
It leans on CuPy internals (the argument-kind numbers below are CuPy 14's), so it is a developer's check,
not a test; on a GPU machine ``pytest -m gpu`` compiles and runs the kernels for real.
"""
import os
import subprocess
import sys
import tempfile

import numpy

import cupy
from cupy._core import _kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from scratchvae.fast import kernels  # noqa: E402

NDARRAY, INDEXER, SCALAR = 1, 2, 3  # CuPy 14's _ArgKind values
INCLUDE = os.path.join(os.path.dirname(cupy.__file__), "_core", "include")
# the parameters the layers pass as Python numbers: every int32 one, and these
SCALARS = {"m", "eps", "momentum", "unbias", "slope", "beta1", "beta2", "step_size", "bias2", "weight_decay"}


def elementwise_source(name, spec, dtype):
    k = cupy.ElementwiseKernel(*spec, name=name, options=kernels.OPTIONS)
    infos = []
    for p in k.in_params + k.out_params:
        dt = numpy.dtype(dtype if p.dtype is None else p.dtype)
        if p.name in SCALARS or dt == numpy.int32:
            infos.append(_kernel._ArgInfo(SCALAR, object, dt, 0, True, True))
        elif p.raw:  # read by index: 4-D and strided, CuPy's general CArray (the images seen as NHWC are)
            infos.append(_kernel._ArgInfo(NDARRAY, cupy.ndarray, dt, 4, False, True))
        else:
            infos.append(_kernel._ArgInfo(NDARRAY, cupy.ndarray, dt, 2, True, True))
    infos.append(_kernel._ArgInfo(INDEXER, object, None, 2, True, True))
    return _kernel._get_elementwise_kernel_code(tuple(infos), _kernel._TypeMap((("T", numpy.dtype(dtype)),)),
                                                k.params, k.operation, name, "")


def reduction_source(name, spec, dtype):
    in_params, out_params, map_expr, reduce_expr, post_map_expr, identity = spec
    ins = [p.split() for p in in_params.split(",")]
    (_, out), = [p.split() for p in out_params.split(",")]
    params = [f"const T {n}" if n in SCALARS else f"const CArray<T, 3, 1, 1> _raw_{n}" for _, n in ins]
    params += [f"CArray<double, 2, 1, 1> _raw_{out}", "CIndexer<3, 1> _in_ind", "CIndexer<2, 1> _out_ind"]
    loads = " ".join(f"const T {n} = _raw_{n}[_in_ind.get()];" for _, n in ins if n not in SCALARS)
    return f"""typedef {numpy.dtype(dtype).name.replace('float32', 'float').replace('float64', 'double')} T;
#define REDUCE(a, b) ({reduce_expr})
#define POST_MAP(a) ({post_map_expr})
typedef double _type_reduce;
extern "C" __global__ void {name}({", ".join(params)}) {{
  _type_reduce _s = _type_reduce({identity});
  for (ptrdiff_t _j = threadIdx.x; _j < _in_ind.size(); _j += blockDim.x) {{
    _in_ind.set(_j);
    {loads}
    _type_reduce _a = static_cast<_type_reduce>({map_expr});
    _s = REDUCE(_s, _a);
  }}
  _out_ind.set(blockIdx.x);
  double &{out} = _raw_{out}[_out_ind.get()];
  POST_MAP(_s);
}}
"""


def main():
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float64"):
            for name, (kind, *spec) in kernels.SPECS.items():
                make = elementwise_source if kind == "elementwise" else reduction_source
                src = os.path.join(tmp, f"{name}_{dtype}.cu")
                with open(src, "w") as f:
                    f.write("#include <cupy/carray.cuh>\n" + make(name, spec, dtype))
                done = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", *kernels.OPTIONS, "-std=c++17", "-I", INCLUDE,
                                       src, "-o", src + ".ptx"], capture_output=True, text=True)
                fused = done.returncode == 0 and "fma." in open(src + ".ptx").read()
                print(f"{name:20s} {dtype}: {'compiles' if done.returncode == 0 else 'FAILS'}"
                      f"{'  (but emits fused multiply-adds)' if fused else ''}")
                if done.returncode or fused:
                    failed.append(f"{name} {dtype}")
                    print(done.stderr[-4000:])
    print("all kernels compile" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
