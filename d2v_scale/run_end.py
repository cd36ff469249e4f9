"""How a run ends when something outside its step fails; pretraining (train.py) and fine-tuning
(finetune.py) end the same way:

- a stop signal (Slurm's, Ctrl-C) while no batch comes: the last completed step is checkpointed (unless
  it already is) and the run exits as a signal stop does (143, Slurm requeues it);
- the data stopped for good (an object store down past `data.stall_timeout_s`): one line naming the
  last complete checkpoint and `--resume auto`;
- another rank died (a collective failed): one line naming the last complete checkpoint.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint
from .data import DataError
from .data.wds import DataStalled
from .dist import print0
from .errors import D2VError
from .preempt import stopped


class TrainingError(D2VError, RuntimeError):
    """Training stopped on purpose (collapse guard, non-finite loss) with the reason and the fix."""


def is_comm_failure(e: Exception) -> bool:
    """A collective failed because another rank died (the message names the last checkpoint)."""
    text = str(e)
    return isinstance(e, torch.distributed.DistBackendError) or any(
        s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "gloo", "NCCL", "ProcessGroup"))


@contextlib.contextmanager
def run_end(run_dir: Path, rank: int, engine, signals, metrics, save: Callable[[int], Path]):
    """Around a run's loop: `save(step)` checkpoints the last completed step; `signals` (preempt.py)
    are restored on the way out, however it ends."""
    ckpts = run_dir / checkpoint.CKPT_DIR
    try:
        yield
    except DataStalled as e:                  # a stop signal while no data comes: keep the last completed step
        step, latest = engine.global_steps, checkpoint.latest_tag(ckpts)
        signals.acknowledge()
        print0(f"d2v: {e}: checkpointing the last completed step ({step})")
        last_saved = ckpts / latest if latest == f"step_{step:08d}" else save(step)
        metrics.close(step, run_dir, str(last_saved))
        raise stopped(signals.flags, step, last_saved, rank == 0) from None
    except DataError as e:                    # the data stopped (an object store down): name the checkpoint
        latest = checkpoint.latest_tag(ckpts)
        raise DataError(f"{e}. The last complete checkpoint is {ckpts / latest if latest else 'none'}; "
                        "rerun with --resume auto once the data can be read") from None
    except (RuntimeError, torch.distributed.DistBackendError) as e:
        if not is_comm_failure(e):
            raise
        latest = checkpoint.latest_tag(ckpts)
        raise TrainingError(f"rank {rank} lost contact with another rank ({type(e).__name__}: {str(e)[:200]}); "
                            f"a rank died or was killed. The last complete checkpoint is {latest}; rerun with "
                            "--resume auto") from None
    finally:
        signals.restore()
