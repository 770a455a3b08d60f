#!/usr/bin/env bash
# Build the docs site into site/ in strict mode (any warning fails), with the docs tools of the
# test venv (scripts/setup.sh test installs the `docs` extra). `scripts/docs.sh serve` serves it
# with live reload instead. Set up the venv first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/mkdocs ] || bash scripts/setup.sh test
if [ "${1:-}" = "serve" ]; then
  exec .venv/bin/mkdocs serve
fi
# NO_MKDOCS_2_WARNING: mkdocs-material 9.7+ prints an advertisement about MkDocs 2.0 on every build.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --clean "$@"
