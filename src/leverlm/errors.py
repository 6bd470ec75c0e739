"""The one error base of leverlm.

Every error a user can cause (a bad config value, a missing or corrupt file, an impossible
setting) is a :class:`LeverError`: the ``leverlm`` command prints ``error: <message>`` on one
line and exits with :attr:`LeverError.exit_code`, never with a traceback. Messages name the
file, field or value and, where it helps, what to do.
"""

from __future__ import annotations


class LeverError(ValueError):
    """A user error: bad input, config, file or environment (exit code 2)."""

    exit_code = 2


class Unfinished(LeverError):
    """A run stopped before its work was done (a limit, a signal): rerun to finish it."""

    exit_code = 3
