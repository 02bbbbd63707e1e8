#!/usr/bin/env bash
# Several nodes: run this same command on every node. c10d rendezvous at MASTER_ADDR:MASTER_PORT
# (a host every node can reach, usually node 0's); torchrun gives each process its global RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/multinode.sh --parallel.strategy=fsdp   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/multinode.sh --parallel.strategy=fsdp   # on node 1
# NPROC_PER_NODE defaults to every visible GPU; extra arguments go to nanotrain.train.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the rendezvous host (node 0)}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
# forward_signals.sh: a SIGTERM or Ctrl-C on any node makes every rank of every node save, and exit 0
exec bash "$(dirname "$0")/forward_signals.sh" torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-nanotrain}" \
  -m nanotrain.train --train.device=cuda "$@"
