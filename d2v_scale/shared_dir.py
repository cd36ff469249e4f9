"""Every rank sees the same run directory: proved at start, checked again at every checkpoint.

A checkpoint is written by every rank into RUN_DIR and made final by rank 0 (checkpoint.py). With a
run directory that is not shared (local disk on each host, a mount missing on one host) each host
would keep its own partial copy and the run would end "successfully" naming a checkpoint that holds
one host's files. So at start rank 0 writes a token into RUN_DIR and every rank reads it back after a
collective (`prove_shared`), and before a checkpoint is made final rank 0 checks that it sees every
file each rank wrote, at the size that rank wrote it (`unseen_file`). Network file systems may show a
file written on another host a moment late (attribute caches): both checks wait up to
D2V_VISIBLE_WITHIN_S (30 s) before refusing.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import torch

from .errors import D2VError

TOKEN = ".shared_check"


class RunDirError(D2VError, RuntimeError):
    """The run directory is not the same directory on every rank; says which rank and host."""


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _until(check, within_s: float | None):
    """check() until it returns None (fine) or within_s passed; its last answer."""
    if within_s is None:
        within_s = float(os.environ.get("D2V_VISIBLE_WITHIN_S", "30"))
    deadline = time.monotonic() + within_s
    while (problem := check()) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    return problem


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        return f"<{type(e).__name__}>"


def prove_shared(run_dir: Path, rank: int, within_s: float | None = None) -> None:
    """Collective, at start: rank 0 writes a token into run_dir, every rank reads it back; every rank
    raises the same RunDirError, naming each rank that does not see it, when one does not."""
    if _world() == 1:
        return
    token = [None]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        token[0] = f"{uuid.uuid4().hex} {socket.gethostname()} {os.getpid()}"
        tmp = run_dir / f"{TOKEN}.tmp"
        tmp.write_text(token[0])
        os.replace(tmp, run_dir / TOKEN)
    torch.distributed.broadcast_object_list(token, src=0)      # also: rank 0 wrote it before anyone reads
    path = run_dir / TOKEN
    _until(lambda: None if _read(path) == token[0] else "unseen", within_s)
    seen = [None] * _world()
    torch.distributed.all_gather_object(seen, (socket.gethostname(), _read(path) == token[0], _read(path)[:40]))
    if rank == 0:
        path.unlink(missing_ok=True)
    blind = [(r, host, what) for r, (host, ok, what) in enumerate(seen) if not ok]
    if blind:
        who = ", ".join(f"rank {r} on {host} ({'no file' if what.startswith('<') else 'another file'})"
                        for r, host, what in blind)
        raise RunDirError(f"the run directory {run_dir} is not shared: {who} does not see the file rank 0 on "
                          f"{seen[0][0]} wrote there ({path}). Every rank writes its part of each checkpoint "
                          f"into it: put --out (OUT) on storage every host mounts at the same path (NFS, Lustre, "
                          f"a shared home) and start again")


def _listing(tmp: Path) -> dict[str, int]:
    return {str(f.relative_to(tmp)): f.stat().st_size for f in tmp.rglob("*") if f.is_file()}


def unseen_file(tmp: Path, rank: int, within_s: float | None = None) -> str | None:
    """Collective, after every rank wrote its part of a checkpoint into `tmp`: None when rank 0 sees
    every file each rank sees there, at the same size; otherwise (on every rank) the first it does not."""
    if _world() == 1:
        return None
    listings = [None] * _world()
    torch.distributed.all_gather_object(listings, (socket.gethostname(), _listing(tmp)))
    verdict = [None]
    if rank == 0:
        def check():
            for r, (host, files) in enumerate(listings):
                for name, size in sorted(files.items()):
                    f = tmp / name
                    have = f.stat().st_size if f.is_file() else None
                    if have != size:
                        return (f"rank 0 on {listings[0][0]} does not see {f} as rank {r} on {host} wrote it "
                                f"({size} bytes; here: {'missing' if have is None else f'{have} bytes'})")
            return None
        verdict[0] = _until(check, within_s)
    torch.distributed.broadcast_object_list(verdict, src=0)
    return verdict[0]
