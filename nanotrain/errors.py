"""The one error type users see, and the guard that turns it into a one-line message.

Every mistake a user can make (config, data, checkpoint, command line) raises a subclass of
`NanotrainError` with a message that says what is wrong and how to fix it. Entry points wrap
their `main` in `exit_on_error`, so the user sees `error: <message>` and exit code 2 instead
of a traceback.
"""

from __future__ import annotations

import functools
import sys


class NanotrainError(Exception):
    """A problem with the user's input, described in one line."""


def exit_on_error(main):
    """Decorator for console entry points: print NanotrainError as one line and exit 2."""

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except NanotrainError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return guarded
