"""Brace patterns of shard names (`train-{000000..000099}.tar`), counted before they are expanded.

webdataset expands `--data` with the `braceexpand` package (bash's grammar: `{a,b}` lists, `{0..9}`
and `{a..e}` ranges with an optional step, nesting, `\\` escapes, `::` between patterns, `${VAR}` from
WDS_VAR). Expanding `{0..999999999}` builds a billion names in memory before anything can be said about
them, so `expand` first counts the names with the same grammar, in arithmetic, and refuses a pattern
above `MAX_SHARDS` with the count; below it the names come from webdataset's own expansion.
"""
from __future__ import annotations

import math
import re
import string

from webdataset.shardlists import envsubst, expand_urls

from ..errors import D2VError

MAX_SHARDS = 1_000_000          # 1M shards of 10,000 samples: 10 billion samples, far beyond any corpus
ALPHABET = string.ascii_uppercase + string.ascii_lowercase     # braceexpand's order for letter ranges
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


class BraceError(D2VError, ValueError):
    """A brace pattern that cannot or should not be expanded."""


def count(pattern: str) -> int:
    """How many names `pattern` expands to (a `::`-joined list: the sum), without expanding it."""
    total = 0
    for part in pattern.split("::"):
        for _ in range(10):                                   # as webdataset: ${VAR} until nothing changes
            part, last = envsubst(part), part
            if part == last:
                break
        total += _pattern(part, pattern)
    return total


def expand(pattern: str, source: str, limit: int = MAX_SHARDS) -> list[str]:
    """The names of `pattern`; BraceError naming `source` and the count when there are more than `limit`."""
    n = count(pattern)
    if n > limit:
        raise BraceError(f"{source} {pattern!r} expands to {n:,} names, more than the limit of {limit:,} shards: "
                         "check the brace range (e.g. shard-{000000..000099}.tar for 100 shards)")
    return expand_urls(pattern)


def _pattern(text: str, whole: str) -> int:
    """A pattern is a product of literals and top-level `{...}` groups."""
    n, depth, start, pos = 1, 0, 0, 0
    while pos < len(text):
        ch = text[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                inner = text[start + 1:pos]
                group = _expression(inner, whole)
                n *= _pattern(inner, whole) if group is None else group   # `{x}`: braces kept, x expanded
        elif ch == "}":
            raise BraceError(f"{whole!r} has unbalanced braces: close each {{ with one }}")
        pos += 1
    if depth:
        raise BraceError(f"{whole!r} has unbalanced braces: close each {{ with one }}")
    return n


def _expression(expr: str, whole: str) -> int | None:
    """Names of a `{...}` group: a range, or a comma list (None: neither, the braces stay literal)."""
    m = _INT_RANGE.match(expr)
    if m:
        a, b, step = int(m[1]), int(m[2]), int(m[3] or 1) or 1
        return math.ceil((abs(b - a) + 1) / step)
    m = _CHAR_RANGE.match(expr)
    if m:
        a, b, step = ALPHABET.index(m[1]), ALPHABET.index(m[2]), int(m[3] or 1) or 1
        return math.ceil((abs(b - a) + 1) / step)
    items, depth, start, pos = [], 0, 0, 0
    while pos < len(expr):
        ch = expr[pos]
        if ch == "\\":
            pos += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth or not items:
        return None
    items.append(expr[start:])
    return sum(_pattern(item, whole) for item in items)
