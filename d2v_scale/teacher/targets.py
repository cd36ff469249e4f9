"""What every teacher shares: the decay schedule, the contextualized targets, the teacher's copy of
the student encoder.

Mirrors fairseq `data2vec2.py: make_targets, set_num_updates`. The teacher is the student encoder
minus its local encoder when `ema_local_encoder` is off (audio: no CNN; text: blocks only); it runs
once per sample, unmasked, in eval mode, and its targets are repeated for the clones by the
student's loss.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def decay_at(step: int, cfg) -> float:
    """tau(step): linear from ema_decay to ema_end_decay over ema_anneal_end_step optimizer steps."""
    if cfg.ema_decay == cfg.ema_end_decay or step >= cfg.ema_anneal_end_step:
        return cfg.ema_end_decay
    return cfg.ema_end_decay - (cfg.ema_end_decay - cfg.ema_decay) * (1 - step / cfg.ema_anneal_end_step)


def _instance_norm(y: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Normalise each (sample, channel) over tokens, fp32, eps 1e-5; padded tokens excluded."""
    if padding_mask is None or not bool(padding_mask.any()):
        return F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2)
    keep = (~padding_mask).unsqueeze(-1).float()                          # (B, T, 1)
    n = keep.sum(1, keepdim=True)
    y = y.float()
    mean = (y * keep).sum(1, keepdim=True) / n
    var = (((y - mean) * keep) ** 2).sum(1, keepdim=True) / n
    return (y - mean) / torch.sqrt(var + 1e-5) * keep


def make_targets(layers: list[torch.Tensor], cfg, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average of the top-K shared-block FFN outputs, each normalised, in fp32 -> (B, T, D).

    cfg: ModelConfig (average_top_k_layers, *_norm_target_layer, layer_norm_targets, instance_norm_targets).
    """
    layers = layers[-cfg.average_top_k_layers:]
    y = None
    for t in layers:                                                      # (B, T, D) each
        if cfg.instance_norm_target_layer:
            t = _instance_norm(t, padding_mask)
        elif cfg.layer_norm_target_layer:
            t = F.layer_norm(t.float(), t.shape[-1:])
        y = t.float() if y is None else y + t.float()
    y = y / len(layers)
    if cfg.layer_norm_targets:
        y = F.layer_norm(y, y.shape[-1:])
    if cfg.instance_norm_targets:
        y = _instance_norm(y, padding_mask)
    return y                                                              # (B, T, D) fp32


def teacher_copy(encoder: nn.Module) -> nn.Module:
    """A frozen copy of the EMA-tracked part of a (plain, not yet partitioned) student encoder."""
    local = {name: getattr(encoder, name) for name in encoder.local_modules}
    if not encoder.ema_local_encoder:  # do not copy modules the teacher never runs
        for name in local:
            setattr(encoder, name, None)
    try:
        module = copy.deepcopy(encoder)
    finally:
        for name, mod in local.items():
            setattr(encoder, name, mod)
    module.requires_grad_(False)
    return module.eval()
