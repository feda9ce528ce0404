#!/usr/bin/env bash
# What a session lent a GPU machine runs there, in one call of the device tool (under 10 minutes: its steps' limits add up to 530 s):
#
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# 1. environment: the GPU, CuPy, NumPy and PyTorch versions;
# 2. tests: every test's CuPy copy (`pytest -m gpu`), the gradient checks included, in float64 on the GPU;
# 3. example: examples/celeba.py on the built-in faces, 300 steps on the GPU, its outputs checked;
# 4. benchmark: bench_train.py, CuPy against PyTorch CUDA at batch 128 (the issue's target), both presets,
#    with the per-layer breakdown, the time the host takes to queue a step's work against the GPU's, and the
#    batch assembly from the host and from a training split kept on the GPU;
# 5. graph: an experiment, benchmarks/graph_step.py: forward + backward captured as a CUDA graph and replayed,
#    checked against the package's own numbers and timed against its step (CuPy 14.2 refuses to capture the
#    step's cuBLAS calls, and the script says so; it runs in 2 s).
# On an H200 (2026-11-26) the whole script took 135-155 s with two benchmark processes per framework (a third, now the
# default, adds about 30 s), and the machine's start 30 s.
#
# It uses that machine's own python3 (CuPy for CUDA 13, PyTorch CUDA, pytest, Pillow and Matplotlib are
# installed there; nothing can be fetched) with this checkout on PYTHONPATH, so nothing is installed.
# Each step has its own time limit, and a failed step does not stop the next. The logs go to $OUT (which the
# device tool sends back), or to ./gpu-session elsewhere; the exit status is 1 if any step failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-session}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
failed=()

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to the screen and $out/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || failed+=("$name")
  return "$rc"
}

step environment 45 "$py" -c '
import numpy, cupy
from scratchvae import backend
print("numpy", numpy.__version__, "cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
print("GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
print("scratchvae sees a usable GPU:", backend.gpu_available())
try:
    import torch
    print("torch", torch.__version__, "CUDA available:", torch.cuda.is_available())
except ImportError:
    print("no torch: the benchmark will time CuPy alone")
assert backend.gpu_available(), "CuPy cannot run a kernel here: every GPU test would skip"
'

xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)  # the tests are launch-bound (host Python): eight processes share the GPU and 16 cores
step tests 120 "$py" -m pytest -q -m gpu -p no:cacheprovider "${xdist[@]}" -rs

if step example 75 "$py" examples/celeba.py --device gpu --max-steps 300 --no-progress --out "$out/run"; then
  for f in vae_mse.png vae_kld.png vae_recons.png samples.png checkpoint.npz summary.json; do
    [ -s "$out/run/$f" ] || { echo "example: $out/run/$f is missing"; failed+=("example-output-$f"); }
  done
  cat "$out/run/summary.json"
fi

# three processes per framework, so that the median is not the one slow process a run sometimes has (in 3 of the
# first 5 H200 runs one scratchvae process ran all its steps 1.5-1.8x slower than the others; with two, the median
# was that one)
# PyTorch eager, NCHW and channels_last; torch.compile on the GPU compiles for about a minute a process, which
# this call has no room for: a later call can time it alone (--torch-configs compile --rounds 1)
step benchmark 230 "$py" benchmarks/bench_train.py --devices gpu --batches 128 --rounds 3 --torch-configs eager channels_last

# an experiment, last so that it cannot cost the figures above: the step's forward + backward as a CUDA graph
step graph 60 "$py" benchmarks/graph_step.py

rm -rf "$out/run"  # the device tool sends back only a few files; the logs above say what the run wrote
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
