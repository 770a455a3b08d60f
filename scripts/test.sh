#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole suite (lint, then pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check src tests
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
