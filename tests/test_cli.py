"""Every command: a command line argparse cannot parse gives one `error:` line and exit 2."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, argv, named", [
    ("train", ["--config"], "argument --config: expected one argument"),
    ("generate", ["--checkpoint", "ckpt", "--prompt", "Once", "--bogus"], "unrecognized arguments: --bogus"),
    ("evaluate", ["--checkpoint", "ckpt", "--data", "data", "--bogus"], "unrecognized arguments: --bogus"),
    ("export", ["--checkpoint", "ckpt", "--out", "out", "--format", "onnx"],
     "argument --format: invalid choice: 'onnx'"),
    ("bench", ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ("plot", [], "the following arguments are required: RUN_DIR"),
    ("prepare", ["input.txt", "--out", "out", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_unparsable_command_line_is_one_line_and_exit_2(tmp_path, module, argv, named):
    proc = subprocess.run([sys.executable, "-m", f"nanotrain.{module}", *argv],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), proc.stderr
    assert "--help' for usage" in lines[0]
    assert proc.stdout == "" and not any(tmp_path.iterdir())  # refused before any work


def test_help_still_prints_usage_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "nanotrain.generate", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m nanotrain.generate")
    assert proc.stderr == ""
