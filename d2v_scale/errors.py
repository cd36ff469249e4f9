"""The errors a user can act on: each message names the problem and the fix, on one line.

Every command prints them as `d2v: error: <message>` and exits non-zero, without a traceback; any
other exception is a bug and keeps its traceback. Modules raise the subclass that names their
concern (ConfigError, DataError, MaskError, CheckpointError, ...).
"""
from __future__ import annotations

import re


class D2VError(Exception):
    """Base of every error whose message is meant for the user (one line, problem and fix)."""


def one_line(text: str, limit: int = 1200) -> str:
    """Collapse a (possibly multi-line) message from a library into one line for an error."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


_URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*@")


def has_url_credentials(text) -> bool:
    """True when `text` holds a URL with credentials written into it (scheme://KEY:SECRET@host/...)."""
    return isinstance(text, str) and _URL_CREDENTIALS.search(text) is not None


def url_credentials_refusal(where: str) -> str:
    """The refusal of such a URL; it never repeats the URL (the secret would land in logs and terminals)."""
    return (f"{where}: a URL with credentials written into it (scheme://KEY:SECRET@...) is refused and not repeated "
            "here; give s3://bucket/key and put the credentials in the environment: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials), AWS_ENDPOINT_URL for the endpoint")


def argument_with_url_credentials(argv: list[str]) -> str | None:
    """The name of the first command-line argument holding such a URL (`--data`, `argument 2 of `image``), or None."""
    for i, arg in enumerate(argv):
        if has_url_credentials(arg):
            if arg.startswith("--") and "=" in arg:
                return arg.split("=", 1)[0]
            if i and argv[i - 1].startswith("--"):
                return argv[i - 1]
            return f"argument {i} of `{argv[0]}`" if i and not argv[0].startswith("-") else f"argument {i + 1}"
    return None
