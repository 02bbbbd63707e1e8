#!/usr/bin/env bash
# N processes on this machine's CPU, gloo backend (a laptop, or trying DDP/FSDP without GPUs).
#   bash launch/cpu.sh [N] [--section.key=value ...]          N defaults to 2
#   bash launch/cpu.sh                                        # DDP, 2 processes: runs/default-ddp2
#   bash launch/cpu.sh 4 --parallel.strategy=fsdp --train.max_steps=50    # FSDP2, 4 processes: runs/default-fsdp4
# Unless --train.out_dir is given, the run directory is named after the preset and the layout, so
# rerunning a command resumes its run.
set -euo pipefail
NPROC=2
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  NPROC=$1; shift
fi
# one thread per process unless told otherwise, so N processes share the cores instead of fighting
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# forward_signals.sh: a SIGTERM or Ctrl-C makes every rank save a checkpoint, and the script exit 0
exec bash "$(dirname "$0")/forward_signals.sh" \
  torchrun --standalone --nproc_per_node="$NPROC" -m nanotrain.train --train.device=cpu "$@"
