#!/usr/bin/env bash
# What to run on a machine with an NVIDIA GPU, in one go: record the environment, build jsp_fast with
# the CUDA kernels against the machine's own torch, run the whole test suite (every `device`-
# parametrised test then also runs its CUDA shapes), then `bench/gpu.py --quick --compile`. Logs, the
# exit status of each step ($OUT/steps.txt) and the benchmark's JSON ($OUT/gpu.json) go to $OUT.
#
#   bash bench/gpu_session.sh                # OUT=./gpu-out, bench step capped at BENCH_TIMEOUT=360 s
#   GRID=full BENCH_TIMEOUT=540 bash bench/gpu_session.sh   # the whole grid
#   bash bench/gpu_session.sh --dry-run      # any machine: print the steps, check the entry points
#
# The machine's python (PYTHON, default python3) must already hold torch, triton, pybind11 and
# scikit-build-core: nothing is downloaded. A failing step does not stop the next one, so one run
# returns as much as it can; the script's exit status is 1 when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# A GPU session measures the compiled core: fail at import if it is missing or partial.
export JSP_FAST_REQUIRE_C=1
: >"$OUT/steps.txt"

step() {  # step NAME CMD...: run it, tee its log, record its exit status
  local name=$1
  shift
  echo "=== $name: $*"
  if [ "$DRY" = 1 ]; then
    echo "$name dry" >>"$OUT/steps.txt"
    return 0
  fi
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  return 0
}
ok() { grep -q "^$1 rc=0 " "$OUT/steps.txt"; }

step env bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name())'; nvcc --version | tail -n 2"
# --no-deps/--no-build-isolation: build against the machine's torch and build tools.
step build env JSP_FAST_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$PY" -m pip install --no-deps --no-build-isolation -q -e .
if [ "$DRY" = 1 ] || [ -n "${FORCE_CMAKE:-}" ] || ! ok build; then
  # Fallback when pip cannot build here (e.g. an older scikit-build-core): plain CMake, the module
  # copied into the source package (jsp_fast/, kernels included in jsp_fast/kernels), the tree first
  # on PYTHONPATH.
  step build_cmake bash -c "test -d jsp_fast/kernels || { echo 'jsp_fast/kernels/ is missing'; exit 1; }; \
    cmake -S . -B build/cmake-cuda -DJSP_FAST_CUDA=ON -DPython_EXECUTABLE=\$(command -v $PY) \
    -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) && cmake --build build/cmake-cuda -j $(nproc) \
    && cp build/cmake-cuda/_C*.so jsp_fast/"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
step build_info "$PY" -c "import jsp_fast._C as C; i = C.build_info(); print(i); assert i['cuda'], 'built without CUDA'"
step tests "$PY" -m pytest -q -p no:cacheprovider -rs tests
grid=--quick
[ "${GRID:-quick}" = full ] && grid=
# shellcheck disable=SC2086  # $grid is empty or one flag
step bench timeout "${BENCH_TIMEOUT:-360}" "$PY" bench/gpu.py $grid --compile --out "$OUT/gpu.json"

if [ "$DRY" = 1 ]; then
  # What a dry run can check without a GPU: the package imports with its compiled core, and the
  # benchmark's command line parses.
  "$PY" -c "import jsp_fast._C as C; print('jsp_fast._C', C.build_info())" &&
    "$PY" bench/gpu.py $grid --compile --help >/dev/null &&
    echo "dry run: OK (steps in $OUT/steps.txt)"
  exit
fi
cat "$OUT/steps.txt"
failed=$(grep -v " rc=0 " "$OUT/steps.txt" | cut -d' ' -f1)
ok build_cmake && failed=$(echo "$failed" | grep -vx build)  # the fallback built it
if [ -n "$failed" ]; then
  echo "failed steps:" $failed
  exit 1
fi
