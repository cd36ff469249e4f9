"""data2vec 1 targets and loss.

Targets: fairseq `examples/data2vec/models/data2vec_audio.py` / `data2vec_text.py` (the `with
torch.no_grad()` block of `forward`) and data2vec_vision `beit/engine_for_cyclical.py:
train_one_epoch`: the top-K block results of the teacher, each instance-normed over time (per
sample and channel) and/or layer-normed over channels, all parameter-free in fp32 with eps 1e-5,
averaged, then optionally layer- or instance-normed again. Padded frames take part in the
instance norm, as in fairseq (it normalises the whole (B, C, T) tensor).

Loss: smooth L1 with `beta` (squared error at beta 0) summed over channels, scaled by `loss_scale`
(None: 1/sqrt(D)) and summed over the masked tokens (fairseq; the trainer divides by the masked
count), or data2vec_vision's `F.smooth_l1_loss(..., beta)` mean over tokens and channels, returned
as a sum x 1/D so that the same division by the masked count gives the mean.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_targets(layers: list[torch.Tensor], cfg) -> torch.Tensor:
    """layers: the teacher's block results (B, T, D), in block order; cfg: ModelConfig -> (B, T, D) fp32."""
    layers = layers[-cfg.average_top_k_layers:]
    y = None
    for t in layers:                                                      # (B, T, D)
        t = t.float()
        if cfg.instance_norm_target_layer:
            t = F.instance_norm(t.transpose(1, 2)).transpose(1, 2)
        if cfg.layer_norm_target_layer:
            t = F.layer_norm(t, t.shape[-1:])
        y = t if y is None else y + t
    y = y / len(layers)
    if cfg.layer_norm_targets:
        y = F.layer_norm(y, y.shape[-1:])
    if cfg.instance_norm_targets:
        y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)
    return y                                                              # (B, T, D) fp32


def regression_loss(pred: torch.Tensor, y: torch.Tensor, cfg, keep: torch.Tensor | None = None) -> torch.Tensor:
    """pred, y: (N, D) -> the summed loss over the rows `keep` (N,) bool marks (None: all) (the trainer
    divides by their count); cfg: ModelConfig."""
    d = cfg.d2v1
    if d.loss_beta == 0:
        err = F.mse_loss(pred.float(), y, reduction="none")               # (N, D)
    else:
        err = F.smooth_l1_loss(pred.float(), y, reduction="none", beta=d.loss_beta)
    if keep is not None:
        err = torch.where(keep[:, None], err, 0.0)                        # (N, D) rows left out weigh 0
    D = pred.shape[-1]
    if d.loss_reduction == "mean":
        return err.sum() / D
    scale = cfg.loss_scale if cfg.loss_scale is not None and cfg.loss_scale > 0 else 1 / math.sqrt(D)
    return err.sum() * scale
