#!/usr/bin/env bash
# The GPU check (jobs/gpu_check.py) from the repository root, with the project's Python:
#   bash jobs/gpu_check.sh --out gpu_check.md     # on a GPU machine, about a minute on an H200
#   bash jobs/gpu_check.sh --smoke                # tiny shapes, runs on a CPU
# The real job (jobs/gpu_real_job.py: aimctl ingest + pretrain through Ray Train on the GPU,
# beside bench step), on a node without Ray/MLflow/pydantic from an offline bundle
# (infra/offline_bundle.py) unpacked first:
#   bash jobs/gpu_check.sh --real-job --bundle build/offline-bundle.tar.xz \
#       --cifar cifar10/test.tar.gz --out real_job.md
#   bash jobs/gpu_check.sh --real-job --smoke     # the same path on a CPU, tiny shapes
# PYTHON=... picks another interpreter (one with torch installed); the default is .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "${1:-}" != "--real-job" ]; then
  exec "$PYTHON" jobs/gpu_check.py "$@"
fi
shift
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--bundle" ]; then
    bundle="$2"; shift 2
    site="${BUNDLE_SITE:-/tmp/aim-offline-site}"
    tmp="$(mktemp -d)"
    tar xJf "$bundle" -C "$tmp"
    # unpack.sh installs the wheels into $site and prints the PYTHONPATH line to use
    eval "$(PATH="$(dirname "$PYTHON"):$PATH" bash "$tmp/offline-bundle/unpack.sh" "$site" | tee /dev/stderr | grep '^export PYTHONPATH=')"
    rm -rf "$tmp"
  else
    args+=("$1"); shift
  fi
done
exec "$PYTHON" jobs/gpu_real_job.py "${args[@]}"
