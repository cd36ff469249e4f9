"""The one place a trained model meets DeepSpeed: `initialize` (model + optimizer + ds_config -> engine).

`build_engine` (pretraining): resolves the DeepSpeed JSON (unless given resolved), checks the masks on
the token grid, builds the student (`Data2Vec`, or another wrapper of it such as the data2vec-1 pattern
of `d2v bench`) with the same seed on every rank, copies the teacher from it before DeepSpeed
partitions anything (as `teacher.placement` says; auto: the cheapest in traffic that fits), after
loading `run.init_from` into the student (the teacher starts from the loaded student, or from the
file's own teacher), compiles the blocks' forwards with `run.compile` (hooks outside), and initializes
it with d2v_scale's AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded). `build_finetune_engine` (fine-tuning):
a task's model (tasks/: a pretrained encoder + head) with layer-wise lr decay, through the same
`initialize`. Training, fine-tuning, every benchmark, the planner's `--measure` and the test probes
go through these; the models themselves never import DeepSpeed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config, ConfigError
from .d2v import Data2Vec
from .student import build_model
from .dist import Dist
from .dsconfig import compute_dtype, offloads_optimizer, resolve_ds_config, zero_stage
from .export import read_weights
from .masking import check_masks
from .memory import placements
from .models import token_grid
from .models.transformer import Block
from .optim import build_optimizer, param_groups_layer_decay
from .teacher import ReplicatedTeacher, ShardedTeacher
from .teacher.placement import choose


@dataclass
class Built:
    engine: object                 # deepspeed.DeepSpeedEngine around the student (or the classifier)
    teacher: object                # ReplicatedTeacher | ShardedTeacher | None (fine-tuning)
    dtype: torch.dtype             # compute dtype (bf16 on GPU, fp32 on CPU)
    ds: dict                       # the resolved DeepSpeed config
    n_params: int                  # student parameters (before any partitioning)


def teacher_placement(cfg: Config, ds: dict, dist: Dist, model: nn.Module | None = None) -> str:
    """`teacher.placement`, with auto = the cheapest in traffic whose run fits the device, by the
    memory `d2v plan` computes (memory.py, teacher/placement.py); `sharded` is `host`."""
    placement = cfg.teacher.placement
    if placement != "auto":
        return "host" if placement == "sharded" else placement
    model = model if model is not None else build_model(cfg)
    s_numels = [p.numel() for p in model.parameters() if p.requires_grad]
    t_numels = [p.numel() for n, p in model.encoder.named_parameters()
                if model.encoder.ema_local_encoder or n.split(".")[0] not in model.encoder.local_modules]
    block = sum(p.numel() for p in model.encoder.blocks[0].parameters())
    micro = int(ds.get("train_micro_batch_size_per_gpu", cfg.data.batch_size))
    gas = int(ds.get("gradient_accumulation_steps", 1))
    bf16 = compute_dtype(ds) == torch.bfloat16
    table = placements(cfg, s_numels, t_numels, block, dist.world, zero_stage(ds), bf16, offloads_optimizer(ds),
                       micro, gas, cfg.model.grad_checkpointing)
    if dist.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(dist.device).total_memory * 0.9
    else:                                                   # the "device" is host memory
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, dist.world)
    return choose({k: v["traffic"] for k, v in table.items()}, {k: v["device_total"] for k, v in table.items()},
                  capacity)


def build_teacher(model: Data2Vec, cfg: Config, ds: dict, dist: Dist):
    """The EMA teacher, copied from the student (with its init weights) before DeepSpeed partitions it."""
    placement = teacher_placement(cfg, ds, dist, model)
    if placement == "replicated":
        return ReplicatedTeacher(model.encoder, cfg.model, dtype=compute_dtype(ds), device=dist.device)
    overlap = {"auto": None, "true": True, "false": False}[cfg.teacher.overlap_ema]
    return ShardedTeacher(model, cfg, dist, placement, dtype=compute_dtype(ds), master_on_host=offloads_optimizer(ds),
                          asynchronous=overlap)


def load_init_weights(model: Data2Vec, path: str) -> dict:
    """Start the student from an imported or exported weights file; returns its teacher state (or {})."""
    student, teacher_state, _ = read_weights(path)
    missing, unexpected = model.load_state_dict(student, strict=False)
    if unexpected or [k for k in missing if k.startswith("encoder.")]:
        raise ConfigError(f"run.init_from={path}: weights do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); check --preset")
    return teacher_state


def compile_forward(module: nn.Module) -> None:
    """torch.compile the module's own `forward`, not its `__call__`: `Module.compile` compiles
    `_call_impl`, so forward hooks (DeepSpeed's ZeRO-3 gather and release) would run inside dynamo."""
    module.forward = torch.compile(module.forward)


def check_compile(ds: dict) -> None:
    """`run.compile` under ZeRO-3 needs the blocks as DeepSpeed leaf modules (ConfigError otherwise)."""
    if zero_stage(ds) != 3:
        return
    name = f"{Block.__module__}.{Block.__qualname__}"
    classes = ds.get("zero_optimization", {}).get("leaf_module", {}).get("classes", [])
    if name not in classes and Block.__name__ not in classes:
        raise ConfigError(f"--run.compile=true under ZeRO-3 needs the blocks as DeepSpeed leaf modules, else "
                          f"DeepSpeed's per-layer gather hooks would run inside the compiled graphs: add "
                          f'"leaf_module": {{"classes": ["{name}"]}} to zero_optimization (as '
                          "ds_configs/zero3.json does), or train without --run.compile")


def compile_regions(model: Data2Vec, teacher, ds: dict) -> None:
    """`run.compile`: each block's forward (student and teacher), and the decoder's below ZeRO-3. Under
    ZeRO-3 DeepSpeed hooks every module it does not treat as a leaf, so a compiled forward is safe
    only where the module is a leaf (its children carry no hooks): the blocks, when the ds_config
    names them in `zero_optimization.leaf_module` (the shipped zero3*.json do); the decoder stays eager."""
    check_compile(ds)
    regions = [*model.encoder.blocks, *teacher.encoder.blocks]
    if zero_stage(ds) != 3 and hasattr(model, "decoder"):     # data2vec 1 has no decoder
        regions.append(model.decoder)
    for region in regions:
        compile_forward(region)


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
    model = build_model(cfg)
    teacher_state = load_init_weights(model, cfg.run.init_from) if cfg.run.init_from else {}
    teacher = build_teacher(model, cfg, ds, dist)           # from the loaded student, or its own weights
    if teacher_state:
        teacher.load_state_dict(teacher_state)
    if cfg.run.compile:
        compile_regions(model, teacher, ds)
    student: nn.Module = wrap(model) if wrap is not None else model
    n_params = sum(p.numel() for p in student.parameters())
    optimizer = build_optimizer(student, cfg.optim, offload=offloads_optimizer(ds))
    return Built(initialize(student, optimizer, ds), teacher, compute_dtype(ds), ds, n_params)


def build_finetune_engine(cfg: Config, ds: dict, model: nn.Module) -> Built:
    """Fine-tuning: a task's model (pretrained `.encoder` + head, tasks/), AdamW with layer-wise lr
    decay (`lr_scale` per group), DeepSpeed; blocks compiled with `run.compile`."""
    if cfg.run.compile:
        check_compile(ds)
        for blk in model.encoder.blocks:
            compile_forward(blk)
    f = cfg.finetune
    groups = param_groups_layer_decay(model, cfg.optim.weight_decay, f.layer_decay, len(model.encoder.blocks),
                                      f.layer_decay_rule)
    optimizer = build_optimizer(model, cfg.optim, offload=offloads_optimizer(ds), groups=groups)
    n_params = sum(p.numel() for p in model.parameters())
    return Built(initialize(model, optimizer, ds), None, compute_dtype(ds), ds, n_params)
