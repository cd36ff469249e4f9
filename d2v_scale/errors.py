"""The errors a user can act on: each message names the problem and the fix, on one line.

Every command prints them as `d2v: error: <message>` and exits non-zero, without a traceback; any
other exception is a bug and keeps its traceback. Modules raise the subclass that names their
concern (ConfigError, DataError, MaskError, CheckpointError, ...).
"""
from __future__ import annotations


class D2VError(Exception):
    """Base of every error whose message is meant for the user (one line, problem and fix)."""


def one_line(text: str, limit: int = 1200) -> str:
    """Collapse a (possibly multi-line) message from a library into one line for an error."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
