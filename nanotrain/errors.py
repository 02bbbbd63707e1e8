"""The error types users see, and the guard that turns them into a one-line message.

Every mistake a user can make (config, data, checkpoint, command line) raises a subclass of
`NanotrainError`, all defined in this module, with a message that says what is wrong and how to
fix it; `first_line` shortens a library's exception for quoting inside one. Entry points wrap
their `main` in `exit_on_error`, so the user sees `error: <message>` and exit code 2 instead
of a traceback, and build their command line with `ArgumentParser`, whose complaints take the
same path. Under torchrun the refusal is printed once, by rank 0 (docs/04, "One line, once").
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path

from nanotrain.files import OUT_OF_SPACE

# Set by launch/forward_signals.sh: a rank refusing bad input writes its exit status here, so the
# script can exit 2 where torchrun itself can only say 1 ("a child failed").
EXIT_STATUS_FILE = "NANOTRAIN_EXIT_STATUS_FILE"
# How long a rank other than 0 waits before printing its own refusal: rank 0 normally meets the
# same refusal at the same point, prints it and exits, and torchrun then stops the other ranks.
OTHER_RANK_GRACE_S = 5.0
# The status of a process killed by SIGPIPE, which is how `cmd | head` ends any Unix tool.
BROKEN_PIPE_STATUS = 128 + 13


class NanotrainError(Exception):
    """A problem with the user's input, described in one line."""


class UsageError(NanotrainError):
    """A command line that argparse cannot parse (unknown flag, missing or malformed value)."""


class ConfigError(NanotrainError):
    """A configuration problem, described in one line that says how to fix it."""


class TokenizerError(NanotrainError):
    """A tokenizer problem, described in one line that says how to fix it."""


class DashboardNotInstalledError(NanotrainError):
    """A dashboard is turned on in the config but its package is not installed."""


class DashboardDirectoryError(NanotrainError):
    """A dashboard's directory in the run directory is a file or cannot be written."""


class PrepareError(NanotrainError):
    """A problem with the inputs or options of preparing a dataset, in one line that says how to fix it."""


class UnwritableOutput(PrepareError):
    """The output directory's file system is out of space or refuses the write; says so, naming the directory."""

    def __init__(self, out: Path, problem: str, reason: str):
        self.problem, self.reason = problem, reason
        if problem == OUT_OF_SPACE:
            message = f"its file system is out of space ({reason}); free some space there or choose another --out"
        else:
            message = f"{reason}; choose a writable --out"
        super().__init__(f"cannot write --out '{out}': {message}; nothing was written")


class DataError(NanotrainError):
    """A dataset problem, described in one line that says how to fix it."""


class CheckpointError(NanotrainError):
    """A checkpoint that cannot be used, described in one line naming the file or the difference."""


class RunDirectoryError(NanotrainError):
    """A run directory that this job cannot use: unwritable, in use, or holding another run."""


class DivergenceError(NanotrainError):
    """The run is diverging; the message names the step and the checkpoint to resume from."""


class EvaluationError(NanotrainError):
    """Evaluation input that does not fit together, in one line."""


class GenerationError(NanotrainError):
    """Bad generation input (prompt, length, sampling setting), in one line."""


class ExportError(NanotrainError):
    """An export or import that cannot be done, in one line that says why."""


def first_line(error: BaseException) -> str:
    """An exception as one short line: the first line of its message, or its type if it has none."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a bad command line as one `error:` line instead of a usage block.

    Every CLI builds its parser from this class inside a main wrapped in `exit_on_error`, so a
    typo gets the same one line and exit status 2 as any other bad input; `--help` is unchanged.
    Abbreviations are off: `--vocab` must not silently mean `--vocab_size`.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message}; run '{self.prog} --help' for usage")


def exit_on_error(main):
    """Decorator for console entry points: print NanotrainError as one line and exit 2.

    A closed output pipe (`... --help-config | head`) ends the command quietly, with the status a
    SIGPIPE would give, instead of a BrokenPipeError traceback.
    """

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not as an "Exception ignored" at interpreter exit
            return result
        except NanotrainError as e:
            report_refusal(str(e))
            raise SystemExit(2) from None
        except BrokenPipeError:
            # Python would complain again when it flushes stdout at exit: point it at /dev/null.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(BROKEN_PIPE_STATUS) from None

    return guarded


def report_refusal(message: str) -> None:
    """Write `error: message` once per job: rank 0 speaks, another rank only if its refusal is its own.

    Without torchrun (no RANK variable) the line is written at once.
    """
    rank = int(os.environ.get("RANK", "0"))
    if status_file := os.environ.get(EXIT_STATUS_FILE):
        try:
            with open(status_file, "w") as f:
                f.write("2\n")
        except OSError:
            pass  # the launch script then reports torchrun's own status; the message below still goes out
    if rank != 0:
        # Rank 0 refuses the same input at the same point and torchrun stops this rank while it waits
        # (leaving with the refusal's status, not as "killed by SIGTERM"); still alive afterwards means
        # the refusal was this rank's alone (its own node's disk, say).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
        time.sleep(OTHER_RANK_GRACE_S)
        message = f"(rank {rank}) {message}"
    # One write of the whole line: ranks sharing torchrun's stderr pipe never interleave mid-line.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
