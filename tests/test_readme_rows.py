"""The README's commands typed in order on a fresh clone, scaled down: each one trains, in a run
directory of its own (named after the preset and the layout, config.default_out_dir).

Before run directories were named after the layout, every row wrote into runs/default: the
2-process rows were refused for another global batch and the tensor-parallel row found step 300
and said "nothing to train". The commands are the README's own text (each is checked to be in
README.md), with flags appended that shrink the model, the corpus and the run.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from nanotrain.checkpoint.manifest import list_checkpoints
from nanotrain.config import load_config, tomllib  # tomllib, or tomli on Python 3.10
from test_checkpoint import REPO, SUBPROCESS_TIMEOUT, subprocess_env

SMALL = [
    "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.d_ff=64",
    "--train.seq_len=32", "--train.batch_size=4", "--train.max_steps=4", "--train.log_every=2",
    "--train.eval_every=4", "--train.eval_steps=1", "--train.sample_tokens=0", "--checkpoint.interval=2",
    "--data.stories_count=300", "--data.stories_vocab_size=320", "--train.peak_tflops=1",
]

# (the command as the README prints it, the run directory it trains in), in the README's order
ROWS = [
    ("python -m nanotrain.train", "runs/default"),
    ("launch/cpu.sh", "runs/default-ddp2"),
    ("torchrun --nproc_per_node=2 -m nanotrain.train --parallel.strategy=fsdp", "runs/default-fsdp2"),
    ("torchrun --nproc_per_node=2 -m nanotrain.train --parallel.tp=2", "runs/default-tp2"),
]


def as_run(command: str) -> list[str]:
    """The README's command as this test runs it: this Python, the repository's script, a free port."""
    program, *args = shlex.split(command)
    if program == "python":
        return [sys.executable, *args]
    if program == "torchrun":
        with socket.socket() as s:  # the default port 29500 may be another test's
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", f"--master_port={port}", *args]
    return ["bash", str(REPO / program), *args]


def test_readme_rows_typed_in_order_each_train_in_a_run_of_their_own(tmp_path):
    readme = (REPO / "README.md").read_text()
    clone = tmp_path / "fresh"  # the working directory, as in a fresh clone: no runs/ yet
    clone.mkdir()
    env = {**subprocess_env(), "NANOTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for command, run_dir in ROWS:
        assert f"`{command}`" in readme, f"the README no longer shows `{command}`: update ROWS"
        proc = subprocess.run(as_run(command) + SMALL, cwd=clone, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT)  # the ranks end with their launcher (parallel/distributed.py)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command}:\n{output[-3000:]}"
        assert "nothing to train" not in output and "error:" not in output, f"{command}:\n{output[-3000:]}"
        assert f"saved checkpoint {run_dir}/checkpoints/step_00000004" in output, f"{command}:\n{output[-3000:]}"
        assert load_config(str(clone / run_dir / "config.toml")).train.out_dir == run_dir
    assert sorted(os.listdir(clone / "runs")) == sorted(Path(run_dir).name for _, run_dir in ROWS)
    for _, run_dir in ROWS:
        assert [step for step, _ in list_checkpoints(clone / run_dir / "checkpoints")] == [4, 2]


def test_readme_names_the_console_scripts_and_the_cpu_thread_setting():
    readme = (REPO / "README.md").read_text()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(f"`{name}`" in readme for name in scripts)
    assert "OMP_NUM_THREADS=1" in readme and "idle 2-core CPU" in readme
