"""Stopping on a signal: every rank agrees, checkpoints at the same step, and (under Slurm) requeues.

SIGUSR1 (Slurm's pre-timeout warning, `#SBATCH --signal=USR1@300`, or `scancel --signal=USR1`) means
"checkpoint and come back": the job saves, rank 0 asks Slurm to requeue it, and the requeued job
resumes from that checkpoint by itself (`--resume auto`). SIGTERM (scancel, preemption, the end of
the time limit, the deepspeed launcher stopping its ranks) and SIGINT (Ctrl-C in the terminal of a
one-node launch) mean "checkpoint and stop". A closed console (the launcher's pdsh/ssh channels go
first) does not end a rank before its checkpoint: see console.py. A signal that arrives while the data
source delivers nothing (an object-store outage) does not wait for a step that cannot come: the loader
raises DataStalled and the last completed step is checkpointed.
A handler only records the signal; the flags travel with the all-reduce every micro-step already
does (the masked-token count), so all ranks see the same decision at the same step and no rank
blocks in a collective the others never enter. The sums of step t are read on the host at step t+1
(`StopSignals.agreed`), copied behind step t's work, so the loop never waits for the device. A signal always ends the process: if no step
completes within `run.stop_timeout_s` of it (a stuck data source, a hung peer), or a second signal
arrives, the process exits at once (143) without a checkpoint, naming the last complete one. Signals
within SAME_STOP_S of the first are that same stop (Ctrl-C reaches a rank from the terminal and, relayed
as SIGTERM, from the launcher a moment later).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch

from .console import keep_output

REQUEUE, TERMINATE = 0, 1
SAME_STOP_S = 2.0


class StopRequested(SystemExit):
    """Raised after the checkpoint is on disk; the exit code tells the scheduler what happened."""


class StopSignals:
    def __init__(self, rank: int, timeout_s: float = 120.0, last_checkpoint=lambda: None, log_dir=None):
        """`log_dir`: where this rank's output goes once its console is closed (console.py)."""
        self.rank, self.timeout_s, self.last_checkpoint = rank, timeout_s, last_checkpoint
        if log_dir is not None:
            keep_output(log_dir, rank)
        self.flags = torch.zeros(2)                    # [USR1 seen, TERM seen] on this rank
        self._timer: threading.Timer | None = None
        self._stopping = False                         # every rank agreed: the checkpoint is being written
        self._pending: _HostCopy | None = None         # the flags summed at the previous boundary step
        self._first_at = 0.0                           # when the first stop signal came
        self._saved = {}                               # the handlers restore() puts back
        for sig, slot in ((signal.SIGUSR1, REQUEUE), (signal.SIGTERM, TERMINATE), (signal.SIGINT, TERMINATE)):
            if signal.getsignal(sig) is not signal.SIG_IGN:   # `nohup`, `cmd &`: left ignored
                self._saved[sig] = signal.signal(sig, self._handler(slot))

    def _handler(self, slot: int):
        def handle(signum, frame):
            name = signal.Signals(signum).name
            if self._stopping:                        # srun's TERM after a requeue, etc.: already on the way out
                print(f"d2v: rank {self.rank} got {name} while stopping: finishing the checkpoint",
                      file=sys.stderr, flush=True)
                return
            if self._timer is not None and time.monotonic() - self._first_at < SAME_STOP_S:
                self.flags[slot] = 1.0                # the same stop, relayed (terminal + launcher)
                return
            if self._timer is not None:               # a second signal before any step agreed: do not wait
                self._give_up(f"a second signal ({name})")
            self.flags[slot] = 1.0
            self._first_at = time.monotonic()
            print(f"d2v: rank {self.rank} got {name}: checkpointing at the next step (exit without a checkpoint "
                  f"if no step completes within {self.timeout_s:.0f} s)", file=sys.stderr, flush=True)
            self._timer = threading.Timer(self.timeout_s, self._give_up, (f"no step completed within "
                                                                          f"{self.timeout_s:.0f} s of {name}",))
            self._timer.daemon = True
            self._timer.start()
        return handle

    def restore(self) -> None:
        """The loop is over: the handlers from before (Ctrl-C raises KeyboardInterrupt again)."""
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if self._timer is not None:
            self._timer.cancel()

    def agreed(self, summed: torch.Tensor) -> torch.Tensor:
        """(2,) flags summed over ranks at the previous boundary step (zeros at the first); `summed`,
        this step's, starts its way to the host. Every rank reads the same sums at the same step."""
        ready, self._pending = self._pending, _HostCopy(summed)
        return ready.value() if ready is not None else torch.zeros(2)

    def requested(self) -> bool:
        """A stop signal arrived on this rank and no step has agreed on it yet (the data loader asks
        while it waits for a batch that does not come). True means the caller stops now and
        checkpoints: the deadline is off from here, as after `acknowledge`."""
        if self.flags.sum() > 0 and not self._stopping:
            self.acknowledge()
            return True
        return False

    def acknowledge(self) -> None:
        """Every rank agreed to stop at this step: the checkpoint follows, no deadline any more, and
        further signals are let pass (the checkpoint is atomic; a SIGKILL leaves the previous one)."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()

    def _give_up(self, why: str) -> None:
        print(f"d2v: rank {self.rank}: {why}: exiting now without a checkpoint; the last complete one is "
              f"{self.last_checkpoint() or 'none'} (rerun with --resume auto)", file=sys.stderr, flush=True)
        os._exit(143)


class _HostCopy:
    """A small device tensor on its way to pinned host memory, queued behind the work already issued."""

    def __init__(self, t: torch.Tensor):
        if t.device.type == "cuda":
            self.buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.buf.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.buf, self.event = t.detach().clone(), None

    def value(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()                   # waits for the work before the copy, not after
        return self.buf


def requeue_slurm_job() -> str:
    """Ask Slurm to put this job back in the queue (run by one rank after the checkpoint is written)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a Slurm job: stopped after the checkpoint; rerun with --resume auto"
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"scontrol requeue {job} failed: {res.stderr.strip()}; resubmit with --resume auto"
    return f"requeued Slurm job {job}; it resumes from this checkpoint"


def stopped(seen: torch.Tensor, step: int, last_saved, is_main: bool) -> StopRequested:
    """After the checkpoint a stop signal asked for (`seen`: the ranks' agreed flags): the Slurm job
    requeued on SIGUSR1 alone, one line said (rank 0), and the exit to raise: 0 requeued, 143 otherwise."""
    requeue = seen[REQUEUE] > 0 and not seen[TERMINATE] > 0
    note = requeue_slurm_job() if requeue and is_main else ""
    if is_main:
        print(f"d2v: stopped by a signal at step {step}; checkpoint {last_saved}. {note}", flush=True)
    return StopRequested(0 if requeue else 143)


def restart_banner() -> str | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return (f"Slurm job {os.environ['SLURM_JOB_ID']}, SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', '0')}, "
            f"nodes {os.environ.get('SLURM_JOB_NODELIST', '?')}")
