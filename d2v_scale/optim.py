"""AdamW parameter groups and the warmup + cosine learning-rate schedule (a pure function of step).

fairseq's "adam" is decoupled-weight-decay AdamW; data2vec 2.0 intends no decay on 1-D params,
biases, the CLS token and `alibi_scale` (it tags them with weight_decay_scale=0, which fairseq as
released never applies: `optim.decay_all=True` reproduces that behaviour).
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


def build_optimizer(model: nn.Module, cfg, offload: bool = False):
    """cfg: OptimConfig. DeepSpeed's CPU Adam when the optimizer state is offloaded, torch AdamW otherwise."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_all)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg) -> float:
    """Learning rate for the update that follows `step` completed updates: linear warmup from 0
    over warmup_steps, then cosine to min_lr at max_steps (fairseq `cosine` with t_mult 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
