"""SentenceClassifier: a pretrained text encoder + RoBERTa's classification head on the `<s>` token.

Mirrors fairseq `examples/data2vec/models/data2vec_text_classification.py: Data2VecTextClassificationModel`
(the encoder's `extract_features(mask=False)`, pooler_dropout 0.0 and tanh by default) with its head,
`fairseq/models/roberta/model.py: RobertaClassificationHead` (dropout, dense D -> D, tanh, dropout,
out_proj D -> C; PyTorch's default Linear init, as heads registered after the model's BERT init get).
C = 1 is a regression head (STS-B). Nothing here knows DeepSpeed.
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import Encoder


class ClassificationHead(nn.Module):
    """fairseq RobertaClassificationHead: the first token's features -> (B, C) logits."""

    def __init__(self, embed_dim: int, num_classes: int, pooler_dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(pooler_dropout)
        self.out_proj = nn.Linear(embed_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features[:, 0, :])                                       # (B, D) the <s> token
        x = self.dropout(torch.tanh(self.dense(x)))                               # (B, D)
        return self.out_proj(x)                                                   # (B, C)


class SentenceClassifier(nn.Module):
    def __init__(self, encoder: Encoder, embed_dim: int, num_classes: int, pooler_dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.head = ClassificationHead(embed_dim, num_classes, pooler_dropout)

    @property
    def num_classes(self) -> int:
        return self.head.out_proj.out_features

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """source (B, T) ids `<s> a </s>[</s> b </s>]` right-padded with <pad> -> (B, C) logits."""
        x, _ = self.encoder.extract_features(source, padding_mask)                # (B, T, D)
        return self.head(x)                                                       # (B, C)
