#!/usr/bin/env bash
# The GPU check (issue 22): CUDA tests, the 100,000² slide on CUDA, one training epoch
# with and without AMP; a table in ${OUT:-gpu-check-out}/gpu_check.md.  Under 5 minutes.
#   benchmarks/gpu_check.sh [--out DIR] [--device cuda:0] [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make setup
exec .venv/bin/python -m benchmarks.gpu_check "$@"
