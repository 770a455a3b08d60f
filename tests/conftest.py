import os
import sys

import pytest

# Keras must pick its backend before its first import; the parity tests run it on torch.
os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(__file__))
from helpers import ISA_LEVELS, ISA_PRESENT  # noqa: E402  (after the path is set)

# The GPU-only tests run where scripts/gpu_check.sh runs them (on a GPU, or --dry-run on the CPU);
# elsewhere they are not collected rather than skipped.
collect_ignore = []
if os.environ.get("RMSPROP_TRITON_DEVICE") != "cuda" and os.environ.get("RMSPROP_GPU_DRY_RUN") != "1":
    collect_ignore.append("test_triton_cuda.py")


@pytest.fixture(params=[pytest.param(level, marks=pytest.mark.skipif(not ISA_PRESENT[level], reason=f"no {level} here"))
                        for level in ISA_LEVELS])  # fmt: skip
def isa(request):
    """Each test runs at each instruction-set level this CPU has (portable, AVX2 + F16C,
    AVX-512): each must give the same bits (and round exactly like torch)."""
    from rmsprop.backends.fused_cpu import native

    chosen = native.use_isa(request.param)
    assert chosen == request.param
    yield chosen
    native.use_isa("best")
