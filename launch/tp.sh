#!/usr/bin/env bash
# One node, N GPUs, tensor parallelism of degree TP inside data parallelism of degree N/TP (a 2-D mesh,
# docs/13-tensor-parallelism.md): each block's matrices are split over TP neighbouring GPUs.
#   bash launch/tp.sh N TP [--section.key=value ...]
# Data parallelism over the remaining N/TP is DDP unless you pass --parallel.strategy=fsdp, e.g.
#   bash launch/tp.sh 8 2 --config tinystories-20m --parallel.strategy=fsdp     # FSDP 4 x TP 2
#   DEVICE=cpu bash launch/tp.sh 4 2 --train.max_steps=50                       # DDP 2 x TP 2 on a CPU (gloo)
set -euo pipefail
if [[ ! "${1:-}" =~ ^[0-9]+$ || ! "${2:-}" =~ ^[0-9]+$ ]]; then
  echo "error: launch/tp.sh: give the number of processes and the tensor-parallel degree first, e.g. bash launch/tp.sh 8 2" >&2
  exit 2
fi
NPROC=$1 TP=$2; shift 2
# 4 CPU processes on a small machine would each start as many threads as there are cores
if [[ ${DEVICE:-cuda} == cpu ]]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
# --standalone: a local rendezvous on a free port; forward_signals.sh: SIGTERM or Ctrl-C saves and exits 0
exec bash "$(dirname "$0")/forward_signals.sh" \
  torchrun --standalone --nproc_per_node="$NPROC" -m nanotrain.train \
  --train.device="${DEVICE:-cuda}" --parallel.tp="$TP" "$@"
