"""One run per run directory: `d2v train` and `d2v finetune` hold RUN_DIR/run.lock for their whole life.

The lock is the kernel's (`flock` on the open lock file, taken by rank 0), so any exit releases it: a
normal end, an exception, a signal, a SIGKILL or a crash. The file holds a JSON record of the holder
(host, pid, start time, command) so that a refused run can name it, and its mtime is a heartbeat the
holder refreshes every `HEARTBEAT_S`.

Stale records. A record whose lock the kernel grants is a run that ended without removing it (killed):
on the same host the pid is checked and the lock taken over, saying so. A record from another host is
trusted only as far as the filesystem shares locks between hosts: NFS (v3 with lockd, v4) carries flock
to the server, but `local_lock=flock`, `nolock` and some parallel filesystems (Lustre with `localflock`)
keep it on each host, where another host's live run would look unlocked. So a record from another host
is stale only when its heartbeat is older than `STALE_S`; until then the run is refused with the time
to wait (or the file to remove, if that host's run is known to be gone).

The file is never replaced by a rename (a lock is on an inode), and it is removed on release only
after a new holder would notice: `acquire` checks that the path still names the inode it locked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

from .errors import D2VError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLockError(D2VError, RuntimeError):
    """Another run holds the run directory; the message names its host and pid and what to do."""


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 1 << 16, 0)
        rec = json.loads(data) if data.strip() else {}
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(rec: dict) -> str:
    return (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}"
            + (f", started {rec['started']}" if rec.get("started") else ""))


def _refusal(path: Path, rec: dict, why: str = "") -> RunLockError:
    return RunLockError(
        f"{path.parent} is in use by another run ({_holder(rec)}){why}: wait for it to end, stop it "
        f"(kill {rec.get('pid', 'PID')} on {rec.get('host', 'its host')}: it checkpoints and exits), or choose "
        f"another --out")


def _judge(path: Path, fd: int) -> tuple[RunLockError | None, str | None]:
    """The lock on `fd` was granted: (refusal, None) if the record still names a live run of another
    host; (None, what to say) for a stale record taken over; (None, None) for no record."""
    rec = _read(fd)
    if not rec or not rec.get("pid"):
        return None, None
    host = socket.gethostname()
    if rec.get("host") == host:
        state = "is no longer running" if not _pid_alive(int(rec["pid"])) else "no longer holds it (a reused pid)"
        return None, f"taking over the lock of a run that ended without releasing it ({_holder(rec)}: pid {rec['pid']} {state})"
    age = time.time() - os.fstat(fd).st_mtime
    if age < STALE_S:
        return _refusal(path, rec, f"; its heartbeat is {age:.0f} s old, and a lock taken on another host may "
                        f"not reach this one on a shared filesystem. If that run is gone, wait "
                        f"{STALE_S - age:.0f} s or remove {path}"), None
    return None, (f"taking over the lock of a run on another host whose heartbeat stopped {age:.0f} s ago "
                  f"({_holder(rec)})")


def check_free(run_dir: Path) -> None:
    """Pre-flight (every rank, `d2v check`): refuse a run directory another run holds; writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)      # shared: ranks probing at once do not collide
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise _refusal(path, _read(fd)) from None
        refusal, _ = _judge(path, fd)
        if refusal is not None:
            raise refusal
    finally:
        os.close(fd)


class RunLock:
    """The held lock: `release()` (idempotent) empties and removes the file, then unlocks."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="d2v-runlock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:
                pass

    def release(self) -> None:
        if self.fd < 0:
            return
        self._stop.set()
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)                                       # unlocks
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def acquire(run_dir: Path, attempts: int = 20) -> tuple[RunLock, str | None]:
    """Take the run directory's lock (this process); returns the lock and what to say about a stale
    record taken over. RunLockError names the holder. A short wait absorbs `d2v check` probing."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    for attempt in range(attempts):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            rec = _read(fd)
            os.close(fd)
            if rec.get("pid") or attempt == attempts - 1:       # a run holds it (a probe writes no record)
                raise _refusal(path, rec) from None
            time.sleep(0.1)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:                                            # the holder removed it as we opened it
            os.close(fd)
            continue
        refusal, said = _judge(path, fd)
        if refusal is not None:
            os.close(fd)
            raise refusal
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        return RunLock(path, fd), said
    raise _refusal(path, {})


def hold(run_dir: Path, dist):
    """Rank 0 takes the lock; every rank learns the outcome, so all of them stop with the same line
    when another run holds the directory. A context manager: the lock on rank 0, nothing elsewhere."""
    import torch

    lock, said, error = None, None, ""
    if dist.is_main:
        try:
            lock, said = acquire(run_dir)
        except RunLockError as e:
            error = str(e)
    if torch.distributed.is_initialized() and dist.world > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunLockError(error)
    if said:
        print(f"d2v: {said}", flush=True)
    return lock if lock is not None else nullcontext()
