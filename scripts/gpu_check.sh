#!/usr/bin/env bash
# The GPU check of the Triton kernel, prepared to work in one run of at most 8 minutes on a fresh
# GPU machine that has torch and triton but may reach no package registry:
#   1. what is there (GPU, torch, triton, pytest-xdist);
#   2. the fused CPU kernel built in place (the tests compare the GPU's results with it, bit for bit);
#   3. the Triton tests on CUDA tensors, compiled (tests/test_triton.py with RMSPROP_TRITON_DEVICE=cuda,
#      and tests/test_triton_cuda.py: a step captured in a CUDA graph and replayed, no host
#      synchronisation, one launch per group, large tensors);
#   4. rmsprop bench --device cuda (Triton vs torch foreach vs torch.compile'd torch vs a
#      device-to-device copy of the same bytes), table printed, JSON and Markdown written.
# Every stage has its own time limit, and runs even if an earlier one failed; the exit status is
# nonzero if any failed. Results (logs, junit XML, bench-cuda.json / .md) go to $OUT if set (the
# device tool's folder), else ./gpu-results.
#
# Usage: bash scripts/gpu_check.sh             on a GPU machine, from a copy of the repository
#        bash scripts/gpu_check.sh --dry-run   here, without a GPU: the same stages on CPU tensors,
#                                              the kernel interpreted, at tiny sizes (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RESULTS=${OUT:-$ROOT/gpu-results}
mkdir -p "$RESULTS"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
# The source tree itself, not an installed copy: nothing to install, nothing to resolve against
# the machine's torch (whatever version it has).
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
START=$SECONDS
FAILED=()

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$RESULTS/gpu_check.log"; }

# stage NAME SECONDS COMMAND...: run it with a time limit, its output to the terminal and NAME.log
stage() {
  local name=$1 limit=$2
  shift 2
  log "stage $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then log "stage $name: ok"; else log "stage $name: FAILED (exit $rc)"; FAILED+=("$name"); fi
}

log "dry run: $DRY; python: $PY; results: $RESULTS"

# 1. what is there
stage environment 60 "$PY" - "$DRY" <<'EOF'
import importlib.util, shutil, subprocess, sys
import torch
dry = sys.argv[1] == "1"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA build", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    sys.exit(f"triton does not import: {exc!r}")
print("pytest-xdist:", importlib.util.find_spec("xdist") is not None)
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
if not dry:
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    print(f"device 0: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB,"
          f" compute capability {props.major}.{props.minor}")
import rmsprop
from rmsprop.backends import fused_triton
print("rmsprop from", rmsprop.__file__)
print("Triton backend available:", fused_triton.is_available(), fused_triton.load_error() or "")
EOF

# 2. the CPU kernel, built into the source tree (a C compiler is all it needs)
if [ "$DRY" = 1 ] && ls src/rmsprop/_rmsprop_cpu*.so >/dev/null 2>&1; then
  log "stage build: skipped (dry run: the kernel is already built here)"
else
  stage build 120 "$PY" setup.py -q build_ext --inplace
fi
"$PY" -c "from rmsprop.backends import fused_cpu as f; print('CPU kernel available:', f.is_available(), f.load_error() or '')" \
  2>&1 | tee -a "$RESULTS/gpu_check.log"

# 3. the tests, compiled on the GPU (dry run: a selection, interpreted on the CPU)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rfE --junitxml="$RESULTS/tests.xml")
# the subprocess probes and the no-triton check exercise the CPU route, already covered by CI
DESELECT="not boundary_probes and not dtensor and not absent_costs"
if [ "$DRY" = 1 ]; then
  RMSPROP_TRITON_DEVICE=cpu RMSPROP_GPU_DRY_RUN=1 stage tests 900 "${PYTEST[@]}" tests/test_triton.py \
    tests/test_triton_cuda.py -k "$DESELECT and (sizes or found_inf or capturable or cuda or compiles or triton-plain)"
else
  XDIST=()
  # 768 option combinations are as many kernel specialisations to compile: spread over processes
  if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); else export RMSPROP_TRITON_SAMPLE=6; fi
  RMSPROP_TRITON_DEVICE=cuda stage tests 230 "${PYTEST[@]}" "${XDIST[@]}" tests/test_triton.py \
    tests/test_triton_cuda.py -k "$DESELECT"
fi

# 4. the benchmark (rows are saved as they are measured: a time-out keeps the finished ones)
if [ "$DRY" = 1 ]; then
  stage bench 900 "$PY" -m rmsprop bench --device cuda --dry-run --no-compile --out "$RESULTS" \
    --configs "1x64M fp32 plain" "10x1M fp32 momentum+centered"
else
  stage bench 200 "$PY" -m rmsprop bench --device cuda --out "$RESULTS"
fi
[ -f "$RESULTS/bench-cuda.md" ] && cat "$RESULTS/bench-cuda.md"

log "done in $((SECONDS - START))s; failed stages: ${FAILED[*]:-none}"
[ "${#FAILED[@]}" = 0 ]
