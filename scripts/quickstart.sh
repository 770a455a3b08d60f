#!/usr/bin/env bash
# Set up .venv and run the main job: RMSProp's claims tested on real training runs, with a report
# in ./report (report.html, report.md, results.json, plots). Extra arguments go to `rmsprop compare`
# (e.g. drop --quick by running: .venv/bin/rmsprop compare --out report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/rmsprop compare --quick --out report "$@"
