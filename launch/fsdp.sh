#!/usr/bin/env bash
# One node, N GPUs, FSDP2: parameters, gradients and optimizer state are sharded over the GPUs
# (one fully_shard unit per transformer block plus the root), for models that do not fit DDP.
#   bash launch/fsdp.sh [N] [--section.key=value ...]
# N defaults to every visible GPU; e.g. keep parameters gathered between forward and backward
# (more memory, less communication):
#   bash launch/fsdp.sh 8 --config tinystories-20m --parallel.reshard_after_forward=false
set -euo pipefail
# The launch is ddp.sh's; overrides apply in order, so this last one picks the strategy.
exec bash "$(dirname "$0")/ddp.sh" "$@" --parallel.strategy=fsdp
