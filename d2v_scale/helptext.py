"""`--help` of the `d2v` and `d2v-shard` commands, read from each command's docstring.

A command's docstring is its help: the first line says what it does (the overview lists it), the
rest shows its main flags one line each. Below them the help lists every flag the command takes
(from its signature, so none is missing) and, for commands that take config keys, where to see
them all (`d2v show_config`). `--help` (or `-h`) anywhere before `--` prints it and runs nothing.
"""
from __future__ import annotations

import inspect
import textwrap

HELP_FLAGS = ("--help", "-h", "-help")
HIDDEN = ("local_rank",)            # accepted for the deepspeed launcher, never typed by a user


def wants_help(argv: list[str]) -> bool:
    """True when `--help`/`-h` is among the arguments (fire's own `-- --help` included)."""
    return any(a in HELP_FLAGS for a in argv)


def _doc(fn) -> str:
    """The docstring as written, less the 4 spaces of a top-level function's body (flag lines keep
    their own indentation; inspect.getdoc would strip it from a docstring made only of flag lines)."""
    first, *rest = (fn.__doc__ or "").split("\n")
    return "\n".join([first.strip()] + [line[4:] if line.startswith("    ") else line.strip() for line in rest]).strip()


def summary(fn) -> str:
    return _doc(fn).split("\n", 1)[0]


def _flags(fn) -> tuple[list[str], list[str], bool]:
    """(positional names, flag names, takes --section.key config keys) from the signature; a required
    argument its docstring shows as `--name` is listed as a flag."""
    positional, flags, keys = [], [], False
    doc = _doc(fn)
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            keys = True
        elif p.kind is p.VAR_POSITIONAL or p.name in HIDDEN:
            continue
        elif p.default is p.empty and f"--{p.name} " not in doc:
            positional.append(p.name.upper())
        else:
            flags.append(f"--{p.name}")
    return positional, flags, keys


def command_help(prog: str, name: str, fn, keys_note: str | None = None) -> str:
    """The help of one command; `keys_note` is printed for a command whose signature takes **keys."""
    positional, flags, keys = _flags(fn)
    doc = _doc(fn)
    usage = " ".join([prog, name, *positional] + (["[--flags]"] if flags or keys else []))
    text = [f"usage: {usage}", "", doc, ""]
    if flags:
        text += textwrap.wrap("all flags: " + " ".join(flags), 100, subsequent_indent="  ")
    if keys and keys_note:
        text += [keys_note]
    return "\n".join(text).rstrip() + "\n"


def overview(prog: str, what: str, commands: dict, aliases: dict[str, str]) -> str:
    """`prog --help`: one line per command (an alias such as import_fairseq is not a second command)."""
    shown = {k: fn for k, fn in commands.items() if k not in aliases}
    width = max(len(k) for k in shown) + 2
    lines = [f"usage: {prog} COMMAND [ARGS] [--flags]", "", what, "", "commands:"]
    lines += [f"  {k:<{width}}{summary(fn)}" for k, fn in shown.items()]
    lines += ["", f"`{prog} COMMAND --help` shows a command's flags."]
    return "\n".join(lines) + "\n"
