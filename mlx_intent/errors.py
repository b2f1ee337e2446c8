"""Errors a user can cause, each with the CLI exit code it maps to.

Library code raises these; the command line (``mlx_intent.cli``) turns them into a message and the code,
so no library module needs click.  Exit codes: 1 an error reported in words; 2 bad usage or bad input;
3 an unknown or missing model; 4 and 5 the warning and critical alerts of ``stats --check``.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable

EXIT_ERROR, EXIT_INPUT, EXIT_MODEL = 1, 2, 3
EXIT_WARNING, EXIT_CRITICAL = 4, 5


class UserError(Exception):
    """An error reported in words, without a traceback."""

    exit_code = EXIT_ERROR


class InputError(UserError, ValueError):
    """Bad input: a missing or malformed file, an empty text, a bad setting."""

    exit_code = EXIT_INPUT


class ModelError(UserError, LookupError):
    """An unknown model, or one that is not on disk."""

    exit_code = EXIT_MODEL


_WARNED: set[Hashable] = set()


def warn_once(key: Hashable, message: str) -> None:
    """A RuntimeWarning on stderr, once per ``key`` in this process: a fault the program works around (a log it
    cannot write, a calibration file it ignores) is said once, not on every answer.  Even under ``-W error`` it
    never raises: the fault is worked around, so it must not stop the work."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    except Warning:
        pass
