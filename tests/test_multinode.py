"""launch/multinode.sh: two "nodes" on this machine (two torchrun agents, one CPU process each, c10d
rendezvous on 127.0.0.1) train the job of one process with the same global batch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from nanotrain.config import load_config
from nanotrain.training.trainer import train
from test_checkpoint import losses
from test_distributed import REPO, STEPS, TINY, TOLERANCE, max_loss_difference, worker_env

SCRIPT = REPO / "launch" / "multinode.sh"
AGENT_TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_env(**variables: str) -> dict:
    env = {**worker_env(), "OMP_NUM_THREADS": "1", **variables}
    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DEVICE", "NPROC_PER_NODE", "RDZV_ID"):
        if name not in variables:
            env.pop(name, None)  # only what the test sets reaches the script
    return env


@pytest.mark.slow
def test_two_simulated_nodes_train_the_single_process_job(tmp_path):
    port, run = str(free_port()), tmp_path / "run"
    # one run dir for both, as on a cluster's shared file system (docs/14-multi-node.md says why)
    overrides = TINY + ["--parallel.strategy=ddp", "--train.batch_size=4", f"--train.out_dir={run}"]
    agents, logs = [], []
    for node_rank in (0, 1):
        env = agent_env(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        DEVICE="cpu", RDZV_ID=tmp_path.name)
        logs.append(tmp_path / f"agent{node_rank}.log")
        with open(logs[-1], "w") as log:
            agents.append(subprocess.Popen(["bash", str(SCRIPT), *overrides], cwd=tmp_path, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
    try:  # the single-process reference trains while the agents do
        reference = train(load_config(None, TINY + ["--train.batch_size=8", f"--train.out_dir={tmp_path / 'single'}"]))
        codes = [agent.wait(timeout=AGENT_TIMEOUT) for agent in agents]
    finally:
        for agent in agents:  # a failure here must not leave an agent or its rank running
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n=====\n".join(output[-3000:] for output in outputs)

    # Rank 0 alone prints and writes the run's files; rank 1 adds only its own state to each checkpoint.
    # The c10d rendezvous, not NODE_RANK, numbers the nodes (by host name and agent PID), so either
    # agent may hold rank 0.
    printing = [i for i, output in enumerate(outputs) if "tokens per optimizer step" in output]
    assert len(printing) == 1, outputs
    assert "layout       2 processes on cpu, strategy ddp, data parallel 2" in outputs[printing[0]]
    assert "1 accum x 2 data-parallel x 4 batch x 16 seq = 128" in outputs[printing[0]]
    assert "| loss" not in outputs[1 - printing[0]] and "Traceback" not in outputs[1 - printing[0]]
    assert {p.name for p in run.iterdir()} == {"config.toml", "metrics.jsonl", "checkpoints", ".lock"}
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in final.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]

    node_losses = losses(run)  # each step logged once
    assert sorted(node_losses) == list(range(1, STEPS + 1))
    difference = max_loss_difference(node_losses, reference.losses)
    assert difference <= TOLERANCE, (difference, node_losses, reference.losses)


@pytest.mark.parametrize("variables, message", [
    ({}, "set NNODES, the number of nodes"),
    ({"NNODES": "2", "NODE_RANK": "first", "MASTER_ADDR": "127.0.0.1"},
     "NODE_RANK is 'first'; set it to this node's index"),
])
def test_bad_environment_is_one_line(tmp_path, variables, message):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=agent_env(**variables), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: launch/multinode.sh: {message}"), proc.stderr
