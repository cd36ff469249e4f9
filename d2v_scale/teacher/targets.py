"""What every teacher shares: the decay schedule, the contextualized targets, the teacher's copy of
the student encoder.

Mirrors fairseq `data2vec2.py: make_targets, set_num_updates`. The teacher is the student encoder
minus its local encoder when `ema_local_encoder` is off (audio: no CNN; text: blocks only); it runs
once per sample, unmasked, in eval mode, and its targets are repeated for the clones by the
student's loss.
"""
from __future__ import annotations

import contextlib
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
    """Normalise each (sample, channel) over tokens, fp32, eps 1e-5; padded tokens excluded (a mask
    is given only where some token pads: encoders return None otherwise, so nothing is asked here)."""
    if padding_mask is None:
        return F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2)
    keep = (~padding_mask).unsqueeze(-1).float()                          # (B, T, 1)
    n = keep.sum(1, keepdim=True)
    y = y.float()
    mean = (y * keep).sum(1, keepdim=True) / n
    var = (((y - mean) * keep) ** 2).sum(1, keepdim=True) / n
    return (y - mean) / torch.sqrt(var + 1e-5) * keep


class TargetSum:
    """`make_targets` one layer at a time: each of the top-K layer results is normalised and added as
    it comes out of its block, so a pass over many micro-batches keeps one fp32 sum per micro-batch
    instead of K layers (the same operations in the same order: the same numbers)."""

    def __init__(self, cfg, n_layers: int, padding_mask: torch.Tensor | None = None):
        self.cfg, self.padding_mask = cfg, padding_mask
        self.first = max(0, n_layers - cfg.average_top_k_layers)         # layers before it do not count
        self.n, self.y = n_layers - self.first, None

    def add(self, index: int, t: torch.Tensor) -> None:
        """The FFN output (B, T, D) of shared layer `index` (0-based)."""
        if index < self.first:
            return
        if self.cfg.instance_norm_target_layer:
            t = _instance_norm(t, self.padding_mask)
        elif self.cfg.layer_norm_target_layer:
            t = F.layer_norm(t.float(), t.shape[-1:])
        self.y = t.float() if self.y is None else self.y + t.float()

    def finish(self) -> torch.Tensor:
        y = self.y / self.n
        if self.cfg.layer_norm_targets:
            y = F.layer_norm(y, y.shape[-1:])
        if self.cfg.instance_norm_targets:
            y = _instance_norm(y, self.padding_mask)
        return y                                                          # (B, T, D) fp32


def make_targets(layers: list[torch.Tensor], cfg, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average of the top-K shared-block FFN outputs, each normalised, in fp32 -> (B, T, D).

    cfg: ModelConfig (average_top_k_layers, *_norm_target_layer, layer_norm_targets, instance_norm_targets).
    """
    acc = TargetSum(cfg, len(layers), padding_mask)
    for i, t in enumerate(layers):                                        # (B, T, D) each
        acc.add(i, t)
    return acc.finish()


@torch.no_grad()
def window_targets(encoder: nn.Module, items: list[tuple], cfg, dtype: torch.dtype, hold=None) -> list[torch.Tensor]:
    """Targets of several micro-batches in one pass over the teacher's blocks: block outer, micro-batch
    inner, so a partitioned teacher gathers each block once for all of them. `items`: (source, feats,
    padding_mask) per micro-batch (feats: the student's local features, used when the teacher has no
    local encoder); `hold(i)`: a context that keeps block i's weights in place (partitioned teachers).
    Each micro-batch sees exactly the operations of `Encoder.forward` + `make_targets` on it alone.
    Memory: per micro-batch one block input (B, E+T, D) in `dtype` and one fp32 sum (B, T, D)."""
    xs, extras, sums = [], [], []
    for source, feats, pad in items:
        if encoder.ema_local_encoder:
            feats, pad = encoder.local_features(source.to(dtype) if source.is_floating_point() else source, pad)
        x, bias, pad_t = encoder.embed(feats.to(dtype), None, 1, pad)    # (B, E+T, D)
        xs.append(x)
        extras.append((bias, pad_t))
        sums.append(TargetSum(cfg, len(encoder.blocks) - encoder.num_prenet, pad))
    E = encoder.num_extra_tokens
    for i, blk in enumerate(encoder.blocks):
        with hold(i) if hold is not None else contextlib.nullcontext():
            for j, (bias, pad_t) in enumerate(extras):
                if i == encoder.num_prenet:
                    xs[j] = encoder.dropout_input(xs[j])
                xs[j], ffn = blk(xs[j], bias, pad_t)
                if i >= encoder.num_prenet:
                    sums[j].add(i - encoder.num_prenet, ffn[:, E:])       # (B, T, D)
    return [s.finish() for s in sums]                                     # (B, T, D) fp32 each


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
