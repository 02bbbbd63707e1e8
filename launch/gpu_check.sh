#!/usr/bin/env bash
# The GPU check, as the one call on a GPU machine: installs only what is missing (never torch),
# runs the CUDA test set and the benchmarks within 8 minutes on an H100, and writes logs and one
# summary table (summary.md, also printed) to OUT_DIR. docs/15-running-on-gpus.md.
#   bash launch/gpu_check.sh OUT_DIR [--wheels DIR] [--budget_s 480]
#   bash launch/gpu_check.sh OUT_DIR --dry_run      # on CPU: the same plan, tiny benchmarks
# Exit status: 0 all passed, 1 a CUDA test failed, 3 only a benchmark failed, 2 bad arguments.
# PYTHON picks the interpreter (default: python), e.g. PYTHON=/opt/conda/bin/python.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m nanotrain.gpu_check "$@"
