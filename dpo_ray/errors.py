"""The base class of errors a user can act on (bad config, input, artifact, a failed check).

The CLI prints such an error as one message and exits with its exit_status (2 unless a subclass says
otherwise), no traceback; anything else is a bug and surfaces in full. Each subclass also keeps its natural
builtin base (ValueError, RuntimeError), so callers that catch those keep working.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error whose message tells the user what to change (file, row, column, expected vs found, the fix).

    exit_status: the CLI's exit status for it (2; a subclass may name another, documented in docs/howto)."""

    exit_status = 2
