#!/usr/bin/env bash
# Several nodes: run this same command on every node. c10d rendezvous at MASTER_ADDR:MASTER_PORT
# (a host every node can reach, usually node 0's); torchrun gives each process its global RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/multinode.sh --parallel.strategy=fsdp   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/multinode.sh --parallel.strategy=fsdp   # on node 1
# NPROC_PER_NODE defaults to every visible GPU; extra arguments go to nanotrain.train.
# DEVICE=cpu (default cuda) trains on CPU with gloo, one process per node unless NPROC_PER_NODE says
# otherwise: two "nodes" on one machine, started concurrently, simulate a multi-node job
# (docs/14-multi-node.md):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 DEVICE=cpu bash launch/multinode.sh \
#     --train.out_dir=runs/two-nodes --train.max_steps=50                 # and the same with NODE_RANK=1
# (its layout, DDP over 2 processes, is launch/cpu.sh's: a run directory of its own keeps it apart)
set -euo pipefail
require() {
  if [[ -z ${!1:-} ]]; then
    echo "error: launch/multinode.sh: set $1, $2 (the same command runs on every node, see its first lines)" >&2
    exit 2
  fi
}
require NNODES "the number of nodes"
require NODE_RANK "the index of this node, 0..NNODES-1"
require MASTER_ADDR "the rendezvous host every node can reach (node 0)"
if [[ ! $NODE_RANK =~ ^[0-9]+$ ]]; then
  echo "error: launch/multinode.sh: NODE_RANK is '$NODE_RANK'; set it to this node's index, 0..NNODES-1" >&2
  exit 2
fi
MASTER_PORT=${MASTER_PORT:-29500}
DEVICE=${DEVICE:-cuda}
if [[ $DEVICE == cpu ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  # several "nodes" on one machine would each start as many threads as there are cores
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
fi
# The c10d rendezvous ignores --node_rank (it numbers the nodes itself), so NODE_RANK only says which
# node hosts the rendezvous store: node 0, at MASTER_ADDR. Said outright, no node has to guess it
# from its host names, a guess that misses where MASTER_ADDR is an alias and that every agent
# makes when all the "nodes" are this machine.
IS_HOST=$(( NODE_RANK == 0 ))
# forward_signals.sh: a SIGTERM or Ctrl-C on any node makes every rank of every node save, and exit 0
exec bash "$(dirname "$0")/forward_signals.sh" torchrun \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-nanotrain}" \
  --rdzv_conf="is_host=$IS_HOST" \
  -m nanotrain.train --train.device="$DEVICE" "$@"
