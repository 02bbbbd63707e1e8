"""How commands end: exit statuses, one refusal line per job, closed pipes, torchrun ranks.

Chapter: docs/04, "Leaving cleanly".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nanotrain import errors
from nanotrain.errors import ArgumentParser, UsageError

REPO = Path(__file__).resolve().parents[1]


def test_abbreviated_flags_are_refused():
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--vocab_size", type=int)
    with pytest.raises(UsageError, match="unrecognized arguments: --vocab"):
        parser.parse_args(["--vocab", "10"])
    assert parser.parse_args(["--vocab_size", "10"]).vocab_size == 10


def test_closed_output_pipe_ends_quietly():
    # The reader is gone before the command writes (importing torch takes far longer than closing).
    proc = subprocess.Popen([sys.executable, "-m", "nanotrain.train", "--print-config"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == errors.BROKEN_PIPE_STATUS
    assert stderr == ""


@pytest.mark.parametrize("rank, prefix", [("0", ""), ("1", "(rank 1) ")])
def test_a_refusal_is_written_by_rank_0_and_names_another_rank(rank, prefix, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv(errors.EXIT_STATUS_FILE, str(tmp_path / "status"))
    monkeypatch.setattr(errors, "OTHER_RANK_GRACE_S", 0.0)

    @errors.exit_on_error
    def main():
        raise errors.NanotrainError("bad input")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {prefix}bad input\n"
    assert (tmp_path / "status").read_text() == "2\n"


ENTRY_SCRIPT = textwrap.dedent("""
    import atexit, sys
    from nanotrain.parallel import distributed

    atexit.register(lambda: print("interpreter finalized", flush=True))

    @distributed.torchrun_entry
    def main():
        print("main ran", end="")  # unflushed: leaving must still deliver it
        how = sys.argv[1]
        if how == "refuse":
            raise SystemExit(2)
        if how == "raise":
            raise RuntimeError("boom in main")

    main()
""")


@pytest.mark.parametrize("how, status", [("return", 0), ("refuse", 2), ("raise", 1)])
def test_a_torchrun_rank_leaves_without_finalizing_and_keeps_its_status(how, status, tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(ENTRY_SCRIPT)
    error_file = tmp_path / "error.json"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "TORCHELASTIC_ERROR_FILE": str(error_file)}
    proc = subprocess.run([sys.executable, str(script), how], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "main ran"  # flushed, and no atexit handler: the interpreter did not finalize
    if how == "raise":
        assert "RuntimeError: boom in main" in proc.stderr  # the traceback, as the interpreter prints it
        assert "boom in main" in json.loads(error_file.read_text())["message"]["message"]  # torchrun's Root Cause
    else:
        assert not error_file.exists()


def test_a_refused_torchrun_job_prints_one_line_and_the_launch_script_exits_2(tmp_path):
    # parallel.tp = 3 cannot split 2 processes: every rank refuses at start.
    proc = subprocess.run(["bash", str(REPO / "launch" / "cpu.sh"), "2", "--parallel.tp=3",
                           f"--train.out_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tp" in lines[0], proc.stderr
