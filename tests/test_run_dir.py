"""The run directory: a refused run leaves it as it was, one job at a time, ranks die with their
launcher, and what a SIGTERM to torchrun or to a launch script does."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanotrain.checkpoint import checkpointer as checkpoint
from nanotrain.checkpoint.checkpointer import verify
from nanotrain.config import load_config
from nanotrain.errors import CheckpointError, RunDirectoryError
from nanotrain.reporting.run_directory import locked
from nanotrain.train import main
from test_checkpoint import REPO, SUBPROCESS_TIMEOUT, args_for, run_cli, run_here, subprocess_env

QUICK = "--train.peak_tflops=1"  # skip measuring the CPU's matmul peak for MFU
ENDLESS = ["--train.max_steps=100000", "--checkpoint.interval=0", QUICK]  # runs until signalled; saves only then


def run(out: Path, *extra: str):
    return run_here(out, QUICK, *extra)


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- refused runs leave the directory alone ------------------------------------------------------

def test_refused_resume_leaves_the_run_config_alone(tmp_path):
    out = tmp_path / "run"
    run(out, "--train.max_steps=2")
    before = (out / "config.toml").read_bytes()
    with pytest.raises(CheckpointError, match="model.d_model is 32 there but 64 now"):
        run(out, "--model.d_model=64", "--train.max_steps=4")
    assert (out / "config.toml").read_bytes() == before
    run(out, "--train.max_steps=4")  # the lock went with the refused run; a resume that goes ahead saves its config
    assert load_config(str(out / "config.toml")).train.max_steps == 4
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "config.toml", "metrics.jsonl"]


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torchrun's error recorder under capsys
def test_fresh_start_over_a_run_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--train.max_steps=2")
    before = files_in(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args_for(out, "--train.batch_size=4", "--checkpoint.on_preempt=false", "--checkpoint.resume=none", QUICK))
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err == (
        f"error: train.out_dir '{out}' already holds a run (checkpoints up to step 2 and a non-empty metrics.jsonl), "
        "which checkpoint.resume = 'none' would overwrite; resume it with --checkpoint.resume=auto, or start afresh "
        f"with a new --train.out_dir (or delete '{out}')\n"
    )
    assert files_in(out) == before  # checkpoints, metrics and config untouched


def test_fresh_start_is_refused_wherever_the_run_lies_and_allowed_on_a_torchrun_restart(tmp_path, monkeypatch):
    metrics_only = tmp_path / "metrics_only"  # no checkpoint, but a logged run
    run(metrics_only, "--train.max_steps=1", "--checkpoint.interval=0")
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(a non-empty metrics.jsonl\)"):
        run(metrics_only, "--checkpoint.resume=none")
    shared = tmp_path / "shared_checkpoints"
    run(tmp_path / "a", "--train.max_steps=2", f"--checkpoint.dir={shared}")
    held = re.escape(f"checkpoint.dir '{shared}' already holds a run (checkpoints up to step 2), which")
    with pytest.raises(RunDirectoryError, match=held + ".*a new --train.out_dir and --checkpoint.dir"):
        run(tmp_path / "b", "--checkpoint.resume=none", f"--checkpoint.dir={shared}")
    # nothing there yet
    run(tmp_path / "b", "--train.max_steps=1", "--checkpoint.resume=none", "--checkpoint.interval=0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun restarting this very job: it starts over
    assert set(run(metrics_only, "--checkpoint.resume=none", "--train.max_steps=2").losses) == {1, 2}


# ---- one job per directory ----------------------------------------------------------------------

def start(cmd: list[str], log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    """Start a long run; its output goes to a file (a pipe nobody reads would fill and stall it)."""
    with open(log, "w") as sink:
        return subprocess.Popen(cmd, cwd=REPO, env={**subprocess_env(), "OMP_NUM_THREADS": "1", **(env_extra or {})},
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_steps(out: Path, proc: subprocess.Popen, steps: int, log: Path) -> None:
    metrics, deadline = out / "metrics.jsonl", time.time() + SUBPROCESS_TIMEOUT
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_second_job_on_the_same_run_directory_is_refused(tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    first = start([sys.executable, "-m", "nanotrain.train", *args_for(out, "--train.batch_size=4", *ENDLESS)], log)
    try:
        wait_for_steps(out, first, 2, log)
        second = run_cli([sys.executable, "-m", "nanotrain.train", *args_for(out, "--train.batch_size=4")])
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr == (
            f"error: train.out_dir '{out}' is in use by another training job "
            f"(PID {first.pid} on {socket.gethostname()}); "
            "wait for that job to end or stop it, or choose another train.out_dir\n"
        )
        assert first.poll() is None, "the first job was disturbed"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=SUBPROCESS_TIMEOUT) == 0, log.read_text()[-3000:]
    finally:
        stop(first)
    assert "preemption signal received" in log.read_text()


def test_checkpoint_dir_elsewhere_is_locked_too(tmp_path):
    shared = tmp_path / "shared_checkpoints"
    shared.mkdir()
    with locked(shared, "checkpoint.dir"):  # as if another job were training into it
        with pytest.raises(RunDirectoryError, match=re.escape(f"checkpoint.dir '{shared}' is in use by another "
                                                              f"training job (PID {os.getpid()} on ")):
            run(tmp_path / "run", f"--checkpoint.dir={shared}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    run(tmp_path / "run", "--train.max_steps=2", f"--checkpoint.dir={shared}")  # free again
    assert [step for step, _ in checkpoint.list_checkpoints(shared)] == [2]


# ---- torchrun: launcher death and SIGTERM ----------------------------------------------------------

def torchrun_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "nanotrain.train", *args_for(out, "--train.batch_size=2", *ENDLESS, *extra)]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc, so it works on any Linux kernel)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # an orphan's zombie waits for whoever reaps orphans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ranks_exit_when_their_launcher_is_sigkilled(tmp_path):
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    launcher = start(torchrun_command(out), log)
    ranks = []
    try:
        wait_for_steps(out, launcher, 3, log)
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 60  # a step, a save and exit take about 2 s here; slack for a loaded machine
        while any(running(pid) for pid in ranks):
            assert time.time() < deadline, f"ranks still training after their launcher died:\n{log.read_text()[-2000:]}"
            time.sleep(0.1)
    finally:
        stop(launcher)
        for pid in filter(running, ranks):
            os.kill(pid, signal.SIGKILL)
    # the orphans took the preemption path: their last step saved, and the directory is free again
    assert "preemption signal received" in log.read_text()
    (step, path), = checkpoint.list_checkpoints(out / "checkpoints")
    assert verify(path, kind="training")["step"] == step >= 3
    with locked(out):
        pass


@pytest.mark.parametrize("launch", ["torchrun", "launch/cpu.sh"])
def test_sigterm_to_the_launcher_saves_on_every_rank(tmp_path, launch):
    """torchrun passes SIGTERM on and the ranks save, but it exits 1 with a traceback; the launch scripts exit 0."""
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    if launch == "torchrun":
        cmd = torchrun_command(out)
    else:
        cmd = ["bash", launch, "2", *args_for(out, "--train.batch_size=2", *ENDLESS)]
    launcher = start(cmd, log)
    try:
        wait_for_steps(out, launcher, 3, log)
        launcher.send_signal(signal.SIGTERM)
        returncode = launcher.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        stop(launcher)
    output = log.read_text()
    (step, path), = checkpoint.list_checkpoints(out / "checkpoints")
    assert verify(path, kind="training")["step"] == step >= 3
    assert f"preemption signal received: saved checkpoint at step {step}" in output
    if launch == "torchrun":
        assert returncode == 1
        assert "Received 15 death signal, shutting down workers" in output
        assert output.rstrip().endswith(
            f"torch.distributed.elastic.multiprocessing.api.SignalException: Process {launcher.pid} got signal: 15")
    else:
        assert returncode == 0, output[-3000:]
        assert "Traceback" not in output and "death signal" not in output
