"""The encoder skeleton of data2vec 1 (fairseq `examples/data2vec/models/data2vec_audio.py`,
`data2vec_text.py`, `data2vec_vision.py`): the student sees every token, the masked ones replaced
by a learned mask embedding, and the teacher's targets come from per-block results.

Subclasses (beit.py, wav2vec2.py, roberta.py) implement `local_features` and `embed`; the blocks
return `(out, ffn)`. `forward(..., return_layers=True)` gives one `BlockResult` per block:
  * `out`: the block output ("end of block", fairseq data2vec_vision `layer_results="end"`);
  * `ffn`: the FFN output before the last residual (and, post-LN, before the final LayerNorm) --
    fairseq's `layer_result` / `fc_results` that data2vec_audio and data2vec_text average, and
    data2vec_vision's `fc_feature` (layer scale and drop path included) with `end_of_block_targets=False`.
The forward keeps the data2vec 2.0 `Encoder` call shape so fine-tuning, probes and CTC run on
these encoders unchanged; `ids_keep` (token dropping) is refused: data2vec 1 keeps every token.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .transformer import Block, Encoder


class BlockResult(NamedTuple):
    out: torch.Tensor   # (B, T, D) block output, extra (CLS) tokens removed
    ffn: torch.Tensor   # (B, T, D) FFN output before the last residual


def post_norm_blocks(cfg) -> list[Block]:
    """fairseq `TransformerSentenceEncoderLayer` / `TransformerEncoderLayer` with normalize_before=False:
    dropout after attention, activation dropout inside the FFN, dropout after fc2 (the FFN result
    is taken before it)."""
    return [Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, attn_drop=cfg.attention_dropout,
                  proj_drop=cfg.encoder_dropout, mlp_drop=(cfg.activation_dropout, 0.0),
                  post_mlp_drop=cfg.encoder_dropout) for _ in range(cfg.depth)]


class Data2Vec1Encoder(Encoder):
    """`local_features(source, padding_mask) -> (feats (B, T, D), padding_mask)` once per sample;
    `embed(feats, mask, clones, padding_mask) -> (x, bias, padding_mask)`: mask embedding at the
    masked tokens, positions, extra tokens, embedding norm/dropout; then the blocks and `norm`."""

    def __init__(self, cfg, blocks: list[nn.Module]):
        nn.Module.__init__(self)   # not Encoder.__init__: its blocks are data2vec 2.0's
        self.num_prenet = 0
        self.blocks = nn.ModuleList(blocks)
        self.layerdrop = [cfg.layerdrop] * len(blocks)    # wav2vec 2.0's encoder_layerdrop (draw_layerdrop)
        self.norm = nn.Identity()

    def embed(self, feats, mask, clones, padding_mask):
        raise NotImplementedError

    def extract_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                         local: Encoder | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `Encoder.extract_features`. A data2vec 1 teacher holds none of the modules the EMA copies
        from the student (speech `pos_conv` and `mask_emb` beside the CNN, text embeddings: d2v1/model.py
        NOT_IN_TEACHER): `local` (the student) lends them for the call, as the training step does."""
        lent = [n for n in local.local_modules if getattr(self, n, None) is None] if local is not None else []
        for name in lent:
            setattr(self, name, getattr(local, name))
        try:
            return super().extract_features(source, padding_mask, local)
        finally:
            for name in lent:
                setattr(self, name, None)

    def forward(self, feats: torch.Tensor, ids_keep: torch.Tensor | None = None, clones: int = 1,
                padding_mask: torch.Tensor | None = None, return_layers: bool = False,
                layer_keep: list[bool] | None = None, mask: torch.Tensor | None = None):
        """feats (B, T, D) from `local_features`; mask (B*clones, T) bool, True = replaced by the mask
        embedding -> (x (B*clones, extra+T, D), [BlockResult per block run] if return_layers)."""
        if ids_keep is not None:
            raise ValueError("data2vec 1 encoders see every token: pass mask=(B, T) bool, not ids_keep")
        x, bias, padding_mask = self.embed(feats, mask, clones, padding_mask)
        layers = []
        E = self.num_extra_tokens
        for i, blk in enumerate(self.blocks):
            if layer_keep is not None and not layer_keep[i]:
                continue  # layerdrop: the same decision on every rank (drawn from a shared seed)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, ffn = checkpoint(blk, x, bias, padding_mask, use_reentrant=False)
            else:
                x, ffn = blk(x, bias, padding_mask)                               # (B, E+T, D) x2
            if return_layers:
                layers.append(BlockResult(x[:, E:], ffn[:, E:]))                  # (B, T, D) x2
        return self.norm(x), layers
