"""The one error type users see, and the guard that turns it into a one-line message.

Every mistake a user can make (config, data, checkpoint, command line) raises a subclass of
`NanotrainError` with a message that says what is wrong and how to fix it. Entry points wrap
their `main` in `exit_on_error`, so the user sees `error: <message>` and exit code 2 instead
of a traceback, and build their command line with `ArgumentParser`, whose complaints take the
same path.
"""

from __future__ import annotations

import argparse
import functools
import sys


class NanotrainError(Exception):
    """A problem with the user's input, described in one line."""


class UsageError(NanotrainError):
    """A command line that argparse cannot parse (unknown flag, missing or malformed value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a bad command line as one `error:` line instead of a usage block.

    Every CLI builds its parser from this class inside a main wrapped in `exit_on_error`, so a
    typo gets the same one line and exit status 2 as any other bad input; `--help` is unchanged.
    """

    def error(self, message: str):
        raise UsageError(f"{message}; run '{self.prog} --help' for usage")


def exit_on_error(main):
    """Decorator for console entry points: print NanotrainError as one line and exit 2."""

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except NanotrainError as e:
            # One write of the whole line: ranks sharing torchrun's stderr pipe never interleave
            # mid-line (print would write the text and the newline separately).
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None

    return guarded
