#!/usr/bin/env bash
# Build the fused kernel with AddressSanitizer and UBSan, and run the kernel's tests and the
# boundary probes against that build. Any finding aborts the run: a non-zero exit.
# Usage: scripts/sanitize.sh [extra pytest arguments]   (after scripts/setup.sh test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CC=${CC:-gcc}
out=build/sanitize
mkdir -p "$out"
# the release flags (setup.py) minus target_clones (RMS_SANITIZE), plus the sanitizers
"$CC" -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
  -std=gnu11 -fno-math-errno -fno-trapping-math -ffp-contract=off -pthread -shared -fPIC \
  -DRMS_SANITIZE -Wall -Wextra -Werror \
  -o "$out/rmsprop_cpu_sanitize.so" src/rmsprop/_cpu/rmsprop_cpu.c
asan=$("$CC" -print-file-name=libasan.so)
ubsan=$("$CC" -print-file-name=libubsan.so)
export RMSPROP_NATIVE_LIB="$PWD/$out/rmsprop_cpu_sanitize.so"
# Python and torch are not instrumented: the runtimes must be loaded first, leaks are Python's.
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# test_fused checks that the library loaded is this one; the probes run it in subprocesses
"$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_probes.py tests/test_validation.py \
  "tests/test_reference.py" -k "fused or probe or validation or Validation or refused or bad" "$@"
# the low-bit formats' kernel paths (int8 codes and scales, bf16 stochastic rounding), every test
"$PY" -m pytest -q -p no:cacheprovider tests/test_lowbit.py "$@"
