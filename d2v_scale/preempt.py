"""Stopping on a signal: every rank agrees, checkpoints at the same step, and (under Slurm) requeues.

SIGUSR1 (Slurm's pre-timeout warning, `#SBATCH --signal=USR1@300`, or `scancel --signal=USR1`) means
"checkpoint and come back": the job saves, rank 0 asks Slurm to requeue it, and the requeued job
resumes from that checkpoint by itself (`--resume auto`). SIGTERM (scancel, preemption, the end of
the time limit, the deepspeed launcher stopping its ranks) means "checkpoint and stop".
A handler only records the signal; the flags travel with the all-reduce every micro-step already
does (the masked-token count), so all ranks see the same decision at the same step and no rank
blocks in a collective the others never enter.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch

REQUEUE, TERMINATE = 0, 1


class StopRequested(SystemExit):
    """Raised after the checkpoint is on disk; the exit code tells the scheduler what happened."""


class StopSignals:
    def __init__(self, rank: int):
        self.rank = rank
        self.flags = torch.zeros(2)                    # [USR1 seen, TERM seen] on this rank
        for sig, slot in ((signal.SIGUSR1, REQUEUE), (signal.SIGTERM, TERMINATE)):
            signal.signal(sig, self._handler(slot))

    def _handler(self, slot: int):
        def handle(signum, frame):
            self.flags[slot] = 1.0
            print(f"d2v: rank {self.rank} got {signal.Signals(signum).name}: checkpointing at the next step",
                  file=sys.stderr, flush=True)
        return handle


def requeue_slurm_job() -> str:
    """Ask Slurm to put this job back in the queue (run by one rank after the checkpoint is written)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a Slurm job: stopped after the checkpoint; rerun with --resume auto"
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"scontrol requeue {job} failed: {res.stderr.strip()}; resubmit with --resume auto"
    return f"requeued Slurm job {job}; it resumes from this checkpoint"


def restart_banner() -> str | None:
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return (f"Slurm job {os.environ['SLURM_JOB_ID']}, SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', '0')}, "
            f"nodes {os.environ.get('SLURM_JOB_NODELIST', '?')}")
