"""RobertaEncoder: the data2vec 1 text encoder (fairseq `examples/data2vec/models/data2vec_text.py`
on `fairseq/models/transformer: TransformerEncoder` as RoBERTa configures it; Hugging Face
`Data2VecTextModel`).

Token embeddings + learned positions (fairseq LearnedPositionalEmbedding: ids pad+1.. for the real
tokens, the pad row for pads; `no_scale_embedding`) -> embedding LayerNorm -> dropout -> post-norm
blocks (`encoder_normalize_before=False`), no LayerNorm after the last block. `local_features` are
the token embeddings alone (no positions, no dropout), so the teacher can read the student's; a
mask (B, T) swaps in the `<mask>` embedding (`model.text.mask_idx`), exactly what feeding RoBERTa
the `<mask>` id does. BERT's 10% random / 10% unchanged tokens are the data side's (the ids given).
"""
from __future__ import annotations

import torch
from torch import nn

from .data2vec1 import Data2Vec1Encoder, post_norm_blocks
from .text import TokenIds


class RobertaEncoder(TokenIds, Data2Vec1Encoder):
    local_modules = ("embed_tokens",)
    ema_local_encoder = False   # fairseq ema_transformer_layers_only: the teacher embeds with the student's table

    def __init__(self, cfg):
        super().__init__(cfg, post_norm_blocks(cfg))
        t, D = cfg.text, cfg.embed_dim
        if t.vocab_size <= 0:
            raise ValueError("model.text.vocab_size is not set: it comes from the sentencepiece model "
                             "(the shards' index.json) or --model.text.vocab_size")
        self.pad_idx = t.pad_idx
        self.mask_idx = t.mask_idx if t.mask_idx >= 0 else t.vocab_size - 1
        if not 0 <= self.mask_idx < t.vocab_size or self.mask_idx == t.pad_idx:
            raise ValueError(f"model.text.mask_idx={t.mask_idx}: the <mask> id must be a vocabulary id "
                             f"(< {t.vocab_size}) other than the pad id {t.pad_idx}")
        self.embed_tokens = nn.Embedding(t.vocab_size, D, padding_idx=t.pad_idx)
        self.embed_positions = nn.Embedding(t.max_positions + t.pad_idx + 1, D, padding_idx=t.pad_idx)
        self.norm_embed = nn.LayerNorm(D, eps=cfg.norm_eps)                # fairseq layernorm_embedding
        self.embed_drop = nn.Dropout(t.dropout)

    def reset_parameters(self) -> None:
        """fairseq `init_bert_params`: N(0, 0.02) Linear and Embedding weights, zero biases and pad rows."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight.data[m.padding_idx].zero_()

    def local_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                       padded: bool | None = None):
        """(B, T) token ids -> (B, T, D) token embeddings, padding mask (True = pad) or None (as
        `TextEncoder.local_features`)."""
        pad = source.eq(self.pad_idx)
        return self.embed_tokens(source), (pad if padded or (padded is None and bool(pad.any())) else None)  # (B, T, D)

    def embed(self, feats, mask, clones, padding_mask):
        x = feats.repeat_interleave(clones, dim=0) if clones > 1 else feats  # (B*M, T, D)
        if clones > 1 and padding_mask is not None:
            padding_mask = padding_mask.repeat_interleave(clones, dim=0)      # (B*M, T)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.embed_tokens.weight[self.mask_idx].to(x.dtype), x)
        B, T, _ = x.shape
        if padding_mask is None:
            positions = torch.arange(1, T + 1, device=x.device).expand(B, T) + self.pad_idx      # (B*M, T)
        else:
            keep = (~padding_mask).long()
            positions = torch.cumsum(keep, dim=1) * keep + self.pad_idx       # fairseq make_positions
        x = self.embed_drop(self.norm_embed(x + self.embed_positions(positions)))             # (B*M, T, D)
        return x, None, padding_mask
