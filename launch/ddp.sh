#!/usr/bin/env bash
# One node, N GPUs, DistributedDataParallel: every GPU holds the whole model and gradients are
# averaged after each optimizer step's last micro-batch.
#   bash launch/ddp.sh [N] [--section.key=value ...]
# N defaults to every visible GPU; the rest of the arguments go to nanotrain.train, e.g.:
#   bash launch/ddp.sh 4 --config tinystories-20m --train.grad_accum_steps=2
set -euo pipefail
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
  NPROC=$1; shift
else
  NPROC=$(nvidia-smi -L | wc -l)
fi
# --standalone: a local rendezvous on a free port, so two jobs on one machine never collide;
# forward_signals.sh: a SIGTERM or Ctrl-C makes every rank save a checkpoint, and the script exit 0
exec bash "$(dirname "$0")/forward_signals.sh" \
  torchrun --standalone --nproc_per_node="$NPROC" -m nanotrain.train \
  --train.device=cuda --parallel.strategy=ddp "$@"
