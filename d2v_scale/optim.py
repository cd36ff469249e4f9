"""AdamW parameter groups and the warmup + cosine (or polynomial) lr schedule (a pure function of step).

fairseq's "adam" is decoupled-weight-decay AdamW; data2vec 2.0 intends no decay on 1-D params,
biases, the CLS token and `alibi_scale` (it tags them with weight_decay_scale=0, which fairseq as
released never applies: `optim.decay_all=True` reproduces that behaviour). Fine-tuning adds
layer-wise lr decay (`param_groups_layer_decay`, timm's name; fairseq's rule by default).
"""
from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "alibi_scale")


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        (no_decay if skip and not decay_all else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def layer_ids(names: list[str], num_blocks: int, rule: str = "fairseq") -> dict[str, int]:
    """Layer id per parameter name of a Classifier (`encoder.blocks.i.*` -> i + 1; n = num_blocks).
    fairseq (`mae_image_classification.py`, data2vec_multi branch): only the blocks are decayed, every
    other parameter (patch embedding, CLS, embedding LayerNorm, fc_norm, head) has id n + 1 (scale 1).
    beit (BEiT/MAE `get_layer_id_for_vit`): patch embedding, CLS and positions id 0, the rest n + 1."""
    ids = {}
    for name in names:
        parts = name.split(".")
        if parts[:2] == ["encoder", "blocks"]:
            ids[name] = int(parts[2]) + 1
        elif rule == "beit" and parts[0] == "encoder" and parts[1] in ("patch_embed", "cls_token", "pos_embed"):
            ids[name] = 0
        else:
            ids[name] = num_blocks + 1
    return ids


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float, num_blocks: int,
                             rule: str = "fairseq") -> list[dict]:
    """AdamW groups with an `lr_scale` of layer_decay ** (n + 1 - layer_id) (block i of n: decay^(n - i));
    no weight decay on 1-D params, biases and NO_DECAY_NAMES, as `param_groups`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = layer_ids([n for n, _ in named], num_blocks, rule)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named:
        skip = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        lid = ids[name]
        g = groups.setdefault((lid, skip), {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                            "lr_scale": layer_decay ** (num_blocks + 1 - lid), "layer_id": lid})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg, offload: bool = False, groups: list[dict] | None = None):
    """cfg: OptimConfig. DeepSpeed's CPU Adam when the optimizer state is offloaded, torch AdamW otherwise.
    `groups` replaces the pretraining parameter groups (fine-tuning's layer decay)."""
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay, cfg.decay_all)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from .dist import build_op
        build_op("CPUAdamBuilder")
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def tri_stage_lr(step: int, cfg) -> float:
    """fairseq `tri_stage_lr_scheduler.py` with phase_ratio: linear warmup from init_lr_scale x lr,
    hold at lr, exponential decay to final_lr_scale x lr over the phases' shares of max_steps, then flat."""
    warmup, hold, decay = (int(r * cfg.max_steps) for r in cfg.phase_ratio)
    init_lr, final_lr = cfg.init_lr_scale * cfg.lr, cfg.final_lr_scale * cfg.lr
    if step < warmup:
        return init_lr + (cfg.lr - init_lr) / warmup * step
    if step < warmup + hold:
        return cfg.lr
    if step <= warmup + hold + decay:
        return cfg.lr * math.exp(math.log(cfg.final_lr_scale) / max(1, decay) * (step - warmup - hold))
    return final_lr


def lr_at(step: int, cfg) -> float:
    """Learning rate for the update that follows `step` completed updates: linear warmup from 0
    over warmup_steps, then cosine to min_lr at max_steps (fairseq `cosine` with t_mult 1), or with
    `schedule` polynomial a straight line to min_lr (fairseq `polynomial_decay`, power 1: GLUE); with
    `schedule` tri_stage, fairseq's tri-stage schedule (`tri_stage_lr`)."""
    if getattr(cfg, "schedule", "cosine") == "tri_stage":
        return tri_stage_lr(step, cfg)
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "polynomial":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 - t)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    """Every group's lr, times its `lr_scale` (layer decay) when it has one."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"] if "lr_scale" in g else lr
