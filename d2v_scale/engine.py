"""The one place a trained model meets DeepSpeed: `initialize` (model + optimizer + ds_config -> engine).

`build_engine` (pretraining): resolves the DeepSpeed JSON (unless given resolved), checks the masks on
the token grid, builds the student (`Data2Vec`, or another wrapper of it such as the data2vec-1 pattern
of `d2v bench`) with the same seed on every rank, copies the teacher from it before DeepSpeed
partitions anything (sharded under ZeRO-3, replicated otherwise, or as `teacher.placement` says),
loads `run.init_from`, compiles the blocks with `run.compile`, and initializes it with d2v_scale's
AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded). `build_finetune_engine` (fine-tuning):
a task's model (tasks/: a pretrained encoder + head) with layer-wise lr decay, through the same
`initialize`. Training, fine-tuning, every benchmark, the planner's `--measure` and the test probes
go through these; the models themselves never import DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import Config, ConfigError
from .d2v import Data2Vec
from .d2v1.model import Data2Vec1
from .dist import Dist
from .dsconfig import compute_dtype, offloads_optimizer, resolve_ds_config, zero_stage
from .export import read_weights
from .masking import check_masks
from .models import token_grid
from .optim import build_optimizer, param_groups_layer_decay
from .sharded_teacher import ShardedTeacher
from .teacher import ReplicatedTeacher


@dataclass
class Built:
    engine: object                 # deepspeed.DeepSpeedEngine around the student (or the classifier)
    teacher: object                # ReplicatedTeacher | ShardedTeacher | None (fine-tuning)
    dtype: torch.dtype             # compute dtype (bf16 on GPU, fp32 on CPU)
    ds: dict                       # the resolved DeepSpeed config
    n_params: int                  # student parameters (before any partitioning)


def teacher_placement(cfg: Config, ds: dict) -> str:
    """`teacher.placement`, with auto = sharded under a ZeRO-3 student, replicated otherwise."""
    placement = cfg.teacher.placement
    if cfg.model.algorithm == "data2vec":      # d2v1/model.py runs the teacher's blocks itself
        if placement == "sharded":
            raise ConfigError("teacher.placement=sharded: the data2vec 1 teacher is replicated (a full copy per "
                              "rank, the student may still run ZeRO-3); use --teacher.placement=auto")
        return "replicated"
    if placement == "auto":
        return "sharded" if zero_stage(ds) == 3 else "replicated"
    return placement


def build_teacher(model: Data2Vec, cfg: Config, ds: dict, dist: Dist):
    """The EMA teacher, copied from the student before DeepSpeed partitions it."""
    if teacher_placement(cfg, ds) == "sharded":
        overlap = {"auto": None, "true": True, "false": False}[cfg.teacher.overlap_ema]
        return ShardedTeacher(model, cfg, ds, dist, asynchronous=overlap)
    return ReplicatedTeacher(model.encoder, cfg.model, dtype=compute_dtype(ds), device=dist.device)


def load_init_weights(model: Data2Vec, teacher, path: str) -> None:
    """Start from an imported or exported weights file (student, and teacher when present; a file
    with an encoder alone, `d2v export` or `d2v import-hf`, starts the teacher as that encoder,
    as every EMA teacher starts as its student)."""
    student, teacher_state, _ = read_weights(path)
    missing, unexpected = model.load_state_dict(student, strict=False)
    if unexpected or [k for k in missing if k.startswith("encoder.")]:
        raise ConfigError(f"run.init_from={path}: weights do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); check --preset")
    if not teacher_state:
        teacher_state = {n: student[f"encoder.{n}"] for n in teacher.names}
    teacher.load_state_dict(teacher_state)


def initialize(model: nn.Module, optimizer, ds: dict):
    """The one `deepspeed.initialize` of a trained model (the sharded teacher has its own, optimizer-less)."""
    import deepspeed                                        # after dist.init(): the accelerator is chosen
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine


def build_engine(cfg: Config, dist: Dist, ds: dict | None = None, ds_overrides: dict | None = None,
                 wrap=None) -> Built:
    """`ds`: the resolved DeepSpeed config (training resolves it in its pre-flight), else it is
    resolved here from `cfg.run.ds_config` and `ds_overrides`. `wrap(model) -> nn.Module` replaces
    the module DeepSpeed trains (it must expose `.encoder`); the teacher is always the data2vec one."""
    ds = ds if ds is not None else resolve_ds_config(cfg, dist.world, ds_overrides)
    check_masks(cfg, token_grid(cfg, cfg.data.min_sample_size))
    torch.manual_seed(cfg.run.seed)                         # identical init on every rank
    model = Data2Vec1(cfg.model) if cfg.model.algorithm == "data2vec" else Data2Vec(cfg.model, cfg.mask.mask_noise_std)
    teacher = build_teacher(model, cfg, ds, dist)
    if cfg.run.init_from:
        load_init_weights(model, teacher, cfg.run.init_from)
    if cfg.run.compile:       # regions: each block and the decoder (graphs stay small, ZeRO hooks outside)
        for region in [*model.encoder.blocks, *teacher.encoder.blocks, *([model.decoder] if hasattr(model, "decoder") else [])]:
            region.compile()
    student: nn.Module = wrap(model) if wrap is not None else model
    n_params = sum(p.numel() for p in student.parameters())
    optimizer = build_optimizer(student, cfg.optim, offload=offloads_optimizer(ds))
    return Built(initialize(student, optimizer, ds), teacher, compute_dtype(ds), ds, n_params)


def build_finetune_engine(cfg: Config, ds: dict, model: nn.Module) -> Built:
    """Fine-tuning: a task's model (pretrained `.encoder` + head, tasks/), AdamW with layer-wise lr
    decay (`lr_scale` per group), DeepSpeed; blocks compiled with `run.compile`."""
    if cfg.run.compile:
        for blk in model.encoder.blocks:
            blk.compile()
    f = cfg.finetune
    groups = param_groups_layer_decay(model, cfg.optim.weight_decay, f.layer_decay, len(model.encoder.blocks),
                                      f.layer_decay_rule)
    optimizer = build_optimizer(model, cfg.optim, offload=offloads_optimizer(ds), groups=groups)
    n_params = sum(p.numel() for p in model.parameters())
    return Built(initialize(model, optimizer, ds), None, compute_dtype(ds), ds, n_params)
