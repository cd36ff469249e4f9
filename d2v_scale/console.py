"""A rank's console output that outlives the console: a closed stdout/stderr never ends a rank.

The deepspeed launcher's pdsh path carries every rank's output through an ssh channel. A stop
through the launcher (Ctrl-C, SIGTERM) closes those channels before the ranks have checkpointed,
and a rank's next write would fail (EPIPE; EIO for a terminal that went away) and end it without
its checkpoint. After `keep_output(log_dir, rank)` the first failed write moves that stream, the
Python object and the file descriptor under it (C++ writes too), to `log_dir/rank{R}.log`, says so
there, and the rank carries on to its checkpoint.
"""
from __future__ import annotations

import errno
import io
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

_GONE = (errno.EPIPE, errno.EIO, errno.ECONNRESET)


class _Output:
    """Stands in for sys.stdout / sys.stderr: unbuffered writes to the file descriptor, moved to the
    log file when the console is gone; everything else is asked of the stream it replaced."""

    def __init__(self, stream, fd: int, log: Path, rank: int):
        self._stream, self._fd, self._log, self._rank = stream, fd, log, rank
        self.moved = False

    def write(self, s: str) -> int:
        data = s.encode(getattr(self._stream, "encoding", None) or "utf-8", "backslashreplace")
        try:
            self._write_all(data)
        except OSError as e:
            if e.errno not in _GONE or self.moved:
                raise
            self._move(e)
            self._write_all(data)
        return len(s)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _move(self, e: OSError) -> None:
        self._log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, self._fd)                       # the descriptor itself: C++ and child writes follow
        os.close(fd)
        self.moved = True
        name = "stdout" if self._fd == 1 else "stderr"
        self._write_all((f"d2v: rank {self._rank} on {socket.gethostname()}: {name} closed "
                         f"({errno.errorcode.get(e.errno, e.errno)}) at {time.strftime('%H:%M:%S')}; "
                         f"its output continues here\n").encode())

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:                        # nothing is buffered here
        pass

    def isatty(self) -> bool:
        return not self.moved and os.isatty(self._fd)

    def fileno(self) -> int:
        return self._fd

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _console(stream, fd: int) -> bool:
    """The stream writes straight to `fd`, and that is a pipe, a socket or a terminal (a file never closes;
    a stream that something else captured is left to it)."""
    try:
        if stream is None or isinstance(stream, _Output) or stream.fileno() != fd:
            return False
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


def keep_output(log_dir: Path, rank: int) -> None:
    """Make this rank's stdout and stderr survive a closed console (see the module's note)."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)   # a write to a closed pipe fails (EPIPE) instead of killing
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if not _console(stream, fd):
            continue
        try:
            stream.flush()
        except OSError:
            pass
        setattr(sys, name, _Output(stream, fd, Path(log_dir) / f"rank{rank}.log", rank))
