#!/usr/bin/env bash
# Everything a GPU session should run, in one call (the device tool's machines are lent for minutes):
# build jsp_fast with the CUDA kernels against the machine's own torch, run the GPU-parametrised
# tests, then bench/gpu.py. Logs and JSON go to $OUT (default ./gpu-out).
#
#   bash bench/gpu_session.sh               # quick grid, bench step capped at BENCH_TIMEOUT=360 s
#   GRID=full BENCH_TIMEOUT=540 bash bench/gpu_session.sh   # the whole grid (may need two calls)
#
# With the device tool: run(command="OUT=$OUT bash bench/gpu_session.sh", timeout_s=600); everything
# comes back under $OUT (steps.txt, one log per step, gpu.json). The machine's python3 holds torch
# and triton (no network there); nothing needs carrying.
#
# Each step's exit status is recorded in $OUT/steps.txt and a failing step does not stop the
# next one, so one call returns as much as it can.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: >"$OUT/steps.txt"

step() {  # step NAME CMD...: run, tee the log, record the exit status
  local name=$1
  shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  return 0
}

step env bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; nvcc --version | tail -n 2"
# --no-deps/--no-build-isolation: use the machine's torch, triton, pybind11 and scikit-build-core
# (nothing can be downloaded there).
step build env JSP_FAST_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 \
  $PY -m pip install --no-deps --no-build-isolation -q -e .
if [ -n "${FORCE_CMAKE:-}" ] || ! grep -q "^build rc=0 " "$OUT/steps.txt"; then
  # Fallback when the machine's scikit-build-core is too old (or pip fails): plain CMake, the module
  # copied next to the sources, kernels/ linked in as jsp_fast.kernels, the tree on PYTHONPATH.
  step build_cmake bash -c "cmake -S . -B build/cmake-cuda -DJSP_FAST_CUDA=ON -DPython_EXECUTABLE=\$(command -v $PY) \
    -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) && cmake --build build/cmake-cuda -j 16 \
    && cp build/cmake-cuda/_C*.so jsp_fast/ && ln -sfn ../kernels jsp_fast/kernels"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
step build_info $PY -c "import jsp_fast, jsp_fast._C as C; print(C.build_info())"
# the whole suite: with a GPU every `device`-parametrised test also runs its larger CUDA shapes
step tests $PY -m pytest -q -p no:cacheprovider -rs tests
# bounded so the whole call ends inside the device tool's 10 minutes; gpu.json is saved after every stage
grid=--quick
[ "${GRID:-quick}" = full ] && grid=
step bench timeout "${BENCH_TIMEOUT:-360}" $PY bench/gpu.py --skip-tests $grid --compile --out "$OUT/gpu.json"
cat "$OUT/steps.txt"
