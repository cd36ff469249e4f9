"""The EMA teacher: one part of the architecture, beside the student and its engine.

  targets.py     what every teacher shares: decay schedule, targets, the teacher's copy of the encoder
  replicated.py  a full copy on every rank (fairseq's layout)
  sharded.py     partitioned like a ZeRO-3 student, its state placed on the device or the host
  ema.py         the EMA's data path: contiguous runs, blended where the student's masters live
"""
from .replicated import ReplicatedTeacher
from .sharded import ShardedTeacher
from .targets import decay_at, make_targets, teacher_copy

__all__ = ["ReplicatedTeacher", "ShardedTeacher", "decay_at", "make_targets", "teacher_copy"]
