"""User-facing errors.

Every error a user can trigger with bad input (a file, a frame, a key, a config value) is raised as a
:class:`PotentialsError` whose message names the offending file/frame/key. Entry-point scripts catch it and
print one line instead of a traceback.
"""

from __future__ import annotations

import functools
import sys


class PotentialsError(Exception):
    """A clear, user-facing error (bad input, missing file, unknown element, ...)."""


def cli_errors(fn):
    """Decorator for script entry points: print a :class:`PotentialsError` as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PotentialsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
