"""The pretraining student a config names: data2vec 2.0's `Data2Vec` (d2v.py) or data2vec 1's
`Data2Vec1` (d2v1/model.py), each the encoder, its head(s) and the loss in one module."""
from __future__ import annotations

from torch import nn

from .d2v import Data2Vec
from .d2v1.model import Data2Vec1


def build_model(cfg) -> nn.Module:
    """cfg: the root Config; `cfg.model.algorithm` picks the student."""
    return Data2Vec1(cfg.model) if cfg.model.algorithm == "data2vec" else Data2Vec(cfg.model, cfg.mask.mask_noise_std)
