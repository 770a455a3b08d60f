import os
import sys

# Keras must pick its backend before its first import; the parity tests run it on torch.
os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(__file__))

# The GPU-only tests run where scripts/gpu_check.sh runs them (on a GPU, or --dry-run on the CPU);
# elsewhere they are not collected rather than skipped.
collect_ignore = []
if os.environ.get("RMSPROP_TRITON_DEVICE") != "cuda" and os.environ.get("RMSPROP_GPU_DRY_RUN") != "1":
    collect_ignore.append("test_triton_cuda.py")
