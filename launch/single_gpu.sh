#!/usr/bin/env bash
# One process on one GPU (the first visible one unless CUDA_VISIBLE_DEVICES says otherwise).
# Extra arguments go to nanotrain.train, e.g.:
#   bash launch/single_gpu.sh --config tinystories-20m --train.precision=bf16
set -euo pipefail
# forward_signals.sh: a SIGTERM or Ctrl-C makes the run save a checkpoint, and the script exit 0
exec bash "$(dirname "$0")/forward_signals.sh" \
  torchrun --standalone --nproc_per_node=1 -m nanotrain.train --train.device=cuda "$@"
