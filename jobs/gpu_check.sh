#!/usr/bin/env bash
# The GPU check (jobs/gpu_check.py) from the repository root, with the project's Python:
#   bash jobs/gpu_check.sh --out gpu_check.md     # on a GPU machine, about a minute on an H200
#   bash jobs/gpu_check.sh --smoke                # tiny shapes, runs on a CPU
# PYTHON=... picks another interpreter (one with torch installed); the default is .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" jobs/gpu_check.py "$@"
