"""What a fine-tuning task is to `d2v finetune` (finetune.py runs the loop, DeepSpeed, checkpoints,
resume, metrics and the best-checkpoint export; a task says everything that depends on the task).

A task is built from the config on every rank; `prepare` runs in the pre-flight (`d2v check` and
every rank before the engine is built) and keeps what it learns from the data (class count, a
dictionary) on the task, so `build_model` and the codecs need nothing else.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..dist import Dist
from ..evaluate import EvalShards, EvalStream
from ..pretrained import EncoderWeights


class Task:
    name = ""                 # --task
    modality = ""             # the encoder it fine-tunes
    metric = ""               # the validation metric that picks the best checkpoint ("val/top1")
    higher_is_better = True
    export_kind = ""          # the kind written into best.safetensors (export.write_weights)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # -- pre-flight --------------------------------------------------------------------------------
    def prepare(self, weights: EncoderWeights, world: int) -> EvalShards:
        """Check the task's data (cfg.data.path: training shards, cfg.finetune.val) against the
        --init weights; raises ConfigError/DataError with the fix. Returns the validation shards."""
        raise NotImplementedError

    def describe(self) -> str:
        """The banner's and `d2v check`'s words for what the data holds ("4 classes")."""
        raise NotImplementedError

    # -- the model and its data -----------------------------------------------------------------------
    def build_model(self, weights: EncoderWeights) -> nn.Module:
        """The model to fine-tune (it exposes `.encoder`, for layer-wise lr decay); same on every rank."""
        raise NotImplementedError

    def train_codec(self):
        raise NotImplementedError

    def val_codec(self):
        raise NotImplementedError

    # -- one micro-step and validation -------------------------------------------------------------------
    def loss(self, model, batch: dict, step: int, dist: Dist, dtype: torch.dtype) -> torch.Tensor:
        """The micro-batch's scalar loss (the loop seeded numpy and torch for it, and steps after)."""
        raise NotImplementedError

    def validate(self, model, stream: EvalStream, dist: Dist, dtype: torch.dtype, num_workers: int) -> dict[str, float]:
        """Metrics over every validation sample, the same on every rank; holds `self.metric`."""
        raise NotImplementedError

    # -- what travels with the run -----------------------------------------------------------------------
    def save_files(self, run_dir: Path) -> None:
        """Files the run needs besides its checkpoints (rank 0, before training)."""

    def export_info(self, state: dict[str, torch.Tensor]) -> dict:
        """Task facts stored in best.safetensors beside the weights."""
        return {}

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best


def with_head(model: nn.Module, weights: EncoderWeights) -> nn.Module:
    """`model` (encoder + a new head) with the weights' own head when they are a fine-tuned model of
    the same task (a classifier fine-tuned again): encoder and head loaded together, strictly."""
    if weights.head:
        model.load_state_dict({**{f"encoder.{k}": v for k, v in weights.encoder.items()}, **weights.head})
    return model
