"""The code style is checked, not hoped for: `ruff check` (rules and line length in pyproject.toml's [tool.ruff]).

ruff is in the dev extra, so CI installs it; a missing ruff fails here rather than skipping, so the check
cannot silently stop running.
"""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ruff_command() -> list[str]:
    """How to run ruff: the module of this interpreter, or else a ruff on PATH."""
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "ruff"]
    if ruff := shutil.which("ruff"):
        return [ruff]
    raise AssertionError('ruff is not installed; install the dev tools with: pip install -e ".[dev]"')


def test_ruff_finds_nothing_in_the_package_and_the_tests():
    result = subprocess.run([*ruff_command(), "check", "--no-cache", "nanotrain", "tests"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"ruff check nanotrain tests found problems:\n{result.stdout}{result.stderr}"
