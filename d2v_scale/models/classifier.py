"""Classifier: a pretrained encoder + pooled tokens + LayerNorm + linear head, for fine-tuning.

Mirrors fairseq `examples/data2vec/models/mae_image_classification.py: MaeImageClassificationModel`
(prediction_mode MEAN_POOLING by default, `fc_norm` LayerNorm eps 1e-6, head trunc-normal std 0.02,
zero bias). The encoder runs on the full input (no mask, one clone); nothing here knows DeepSpeed.
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import Encoder, pool_tokens


class Classifier(nn.Module):
    def __init__(self, encoder: Encoder, embed_dim: int, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, pad = self.encoder.extract_features(source, padding_mask)              # (B, E+T, D)
        x = pool_tokens(x, self.pool, self.encoder.num_extra_tokens, pad)         # (B, D)
        return self.head(self.fc_norm(x))                                         # (B, C) logits
