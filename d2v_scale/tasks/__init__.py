"""Fine-tuning tasks of `d2v finetune --task NAME` (task.py: what a task provides)."""
from __future__ import annotations

from ..config import Config, ConfigError
from .audio_ctc import AudioCTC
from .image import ImageClassification
from .task import Task
from .text import TextClassification

TASKS: dict[str, type[Task]] = {"image_classification": ImageClassification, "audio_ctc": AudioCTC,
                                "text_classification": TextClassification}


def get_task(cfg: Config) -> Task:
    """The task `cfg.finetune.task` names, built from cfg."""
    name = cfg.finetune.task
    if name not in TASKS:
        raise ConfigError(f"--task {name!r}: one of {', '.join(TASKS)}")
    return TASKS[name](cfg)


__all__ = ["TASKS", "Task", "get_task"]
