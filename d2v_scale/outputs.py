"""The files a command writes under a name the user gives (`d2v export`, `d2v import-fairseq`,
`d2v-shard spm-train`, `d2v-shard manifest`): never inside a run's checkpoints, never over an existing
file without `--overwrite`, and written atomically (a temporary file beside it, renamed when complete;
removed if the write fails or is interrupted), so a command never leaves a half-written file.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import CKPT_DIR
from .errors import D2VError

_STEP = re.compile(r"^step_\d+(_universal)?(\.tmp)?$")


class OutputError(D2VError, ValueError):
    """An output path that would destroy something or cannot be written; says what to pick instead."""


def _checkpoint_dir_of(path: Path) -> Path | None:
    """The run's checkpoints/ (or a step_* checkpoint) that `path` lies in, if any."""
    for parent in path.parents:
        if parent.name == CKPT_DIR and ((parent / "latest").exists() or (parent.parent / "config.json").exists()
                                        or parent.is_dir() and any(_STEP.match(p.name) for p in parent.iterdir()
                                                                   if p.is_dir())):
            return parent
        if _STEP.match(parent.name) and (parent / "meta.json").exists():
            return parent
    return None


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """`path` as a Path if the command may write it; OutputError with the fix otherwise."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file name, e.g. {path / 'encoder.safetensors'}")
    inside = _checkpoint_dir_of(path.resolve())
    if inside is not None:
        run = inside.parent if inside.name == CKPT_DIR else inside.parent.parent
        raise OutputError(f"{path} is inside the checkpoints of run {run}: writing there would replace a file a "
                          f"resume reads; write outside {inside}, e.g. {run / path.name}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path} already exists: pass --overwrite to replace it, or choose another output path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a directory; choose another output path")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: {parent} is not writable; choose another output path")
    return path


@contextmanager
def atomic(path: str | Path, suffix: str = ".partial"):
    """Yields the temporary path to write; renamed onto `path` on success, removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
