"""Object-storage access for shards and index files (local paths pass through)."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse


def read_bytes(url: str) -> bytes:
    """Whole contents of a small object (an index JSON): local path or file:// for now."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else url).read_bytes()
    raise ValueError(f"unsupported URL scheme in {url!r}")
