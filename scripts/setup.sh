#!/usr/bin/env bash
# Create .venv (if missing) and install rmsprop into it, with pinned torch (CPU build).
# Usage: scripts/setup.sh [test]   -- "test" also installs the test tools, the peer libraries, the
# frameworks the integration examples use, and the docs tools (extras test, integrations, docs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch is pinned: a looser requirement can pull a multi-GB CUDA build.
if [ "${1:-}" = "test" ]; then
  # The suite needs the fused kernel: a build without a C compiler fails here instead of later.
  RMSPROP_REQUIRE_KERNEL=1 pip install -q -c scripts/constraints.txt "torch==2.13.0" -e ".[test,integrations,docs]"
  # timm's RMSpropTF is a parity peer; timm itself requires torchvision, which we never import
  # (the tests load timm/optim's files directly), so it is installed without dependencies.
  pip install -q --no-deps -c scripts/constraints.txt timm
else
  pip install -q -c scripts/constraints.txt "torch==2.13.0" -e ".[report]"
fi
