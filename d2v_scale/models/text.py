"""TextEncoder: the data2vec 2.0 language encoder (fairseq `modalities/text.py: TextEncoder`).

Token embeddings + learned positions (fairseq LearnedPositionalEmbedding: ids 2..L+1, row 1 = pad)
-> embedding LayerNorm -> dropout are the local features (the teacher reuses them, dropout included);
masked tokens are dropped outright (no mask token), and there is no embedding LayerNorm before the
blocks (prenet depth 0). The teacher is the blocks only.
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import Encoder


class TokenIds:
    """What both text encoders (data2vec 2.0's and RoBERTa, roberta.py) read from their input: one
    token per id, padding where the id is `pad_idx` (set by the encoder)."""
    pad_idx: int

    def token_shape(self, source: torch.Tensor, padding_mask=None) -> tuple[int]:
        return (source.shape[-1],)

    def has_padding(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> bool:
        return bool((source.cpu().numpy() == self.pad_idx).any())          # the loader's ids, read on the host


class TextEncoder(TokenIds, Encoder):
    local_modules = ("embed_tokens", "embed_positions", "norm_embed")
    ema_local_encoder = False     # fairseq ema_encoder_only: the teacher is the blocks
    decoder_default_init = False  # the text decoder keeps BERT init (fairseq does not reset it)

    def __init__(self, cfg):
        super().__init__(cfg)
        t, D = cfg.text, cfg.embed_dim
        if t.vocab_size <= 0:
            raise ValueError("model.text.vocab_size is not set: it comes from the sentencepiece model "
                             "(the shards' index.json) or --model.text.vocab_size")
        self.pad_idx = t.pad_idx
        self.embed_tokens = nn.Embedding(t.vocab_size, D, padding_idx=t.pad_idx)
        self.embed_positions = nn.Embedding(t.max_positions + t.pad_idx + 1, D, padding_idx=t.pad_idx)
        self.norm_embed = nn.LayerNorm(D)                                   # eps 1e-5 (fairseq LayerNorm)
        self.embed_drop = nn.Dropout(t.dropout)
        self.pre_drop = nn.Dropout(cfg.prenet_dropout)

    def local_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                       padded: bool | None = None):
        """(B, T) token ids -> (B, T, D), padding mask (True = pad) or None: None when `padded` is
        False (decided on the host), or, `padded` None, when no id is the pad id (a host wait on a GPU)."""
        not_pad = source.ne(self.pad_idx)
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_idx   # fairseq make_positions
        x = self.embed_tokens(source) + self.embed_positions(positions)     # (B, T, D)
        x = self.embed_drop(self.norm_embed(x))
        pad = ~not_pad
        return x, (pad if padded or (padded is None and bool(pad.any())) else None)

    def embed(self, feats, ids_keep, clones, padding_mask):
        x = feats.repeat_interleave(clones, dim=0) if clones > 1 else feats  # (B*M, T, D)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B*M, T_keep, D)
            if padding_mask is not None:                                      # kept even if no kept token pads:
                padding_mask = torch.gather(padding_mask, 1, ids_keep)        # asking would wait (B*M, T_keep)
        return self.pre_drop(x), None, padding_mask
