"""CTCModel: a pretrained audio encoder + dropout + a linear CTC head over the letter dictionary.

Mirrors fairseq `examples/wav2vec` fine-tuning, `fairseq/models/wav2vec/wav2vec2_asr.py: Wav2VecCtc,
Wav2VecEncoder` (final dropout, `proj` Linear with xavier-uniform weight and zero bias; the whole
encoder under no_grad while `freeze_finetune_updates` lasts; feature_grad_mult 0: the CNN feature
encoder never trains), with the masking of `fairseq/models/wav2vec/wav2vec2.py: apply_mask` during
training: time spans of the local features replaced by a learned mask embedding (`mask_emb`,
uniform init) and channel spans zeroed, spans drawn as `fairseq/data/data_utils.py:
compute_mask_indices` (mask_type static, overlap allowed). Padded frames are zeroed before the
positional convolution, as fairseq's TransformerEncoder does. Nothing here knows DeepSpeed.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from .transformer import Encoder


def span_mask(shape: tuple[int, int], lengths: list[int], prob: float, span: int, min_masks: int,
              rng: np.random.RandomState) -> np.ndarray:
    """(B, T) bool: per row, int(prob * len / span + U[0,1)) spans of `span` starting at distinct
    random positions (at least `min_masks`), clipped to the row's unpadded length `len`."""
    B, T = shape
    mask = np.zeros((B, T), dtype=bool)
    for i, sz in enumerate(lengths):
        num = max(min_masks, int(prob * sz / float(span) + rng.rand()))
        length = min(span, sz - 1)
        if num == 0 or length <= 0:
            continue
        num = min(num, sz - length)                                 # distinct starts in [0, sz - length)
        if num <= 0:
            continue
        starts = rng.choice(sz - length, num, replace=False)        # (num,)
        idx = (starts[:, None] + np.arange(span)[None]).reshape(-1)  # (num * span,)
        mask[i, np.unique(idx[idx < sz])] = True
    return mask


class CTCModel(nn.Module):
    """source (B, S) waveform [+ padding_mask (B, S)] -> logits (B, T, V) and the frame padding (B, T)."""

    def __init__(self, encoder: Encoder, embed_dim: int, vocab_size: int, final_dropout: float = 0.0,
                 mask_prob: float = 0.0, mask_length: int = 10, mask_channel_prob: float = 0.0,
                 mask_channel_length: int = 64, freeze_feature_encoder: bool = True):
        super().__init__()
        self.encoder = encoder
        self.mask_prob, self.mask_length = mask_prob, mask_length
        self.mask_channel_prob, self.mask_channel_length = mask_channel_prob, mask_channel_length
        self.mask_emb = nn.Parameter(torch.empty(embed_dim).uniform_())            # wav2vec2.py: uniform_()
        self.final_dropout = nn.Dropout(final_dropout)
        self.head = nn.Linear(embed_dim, vocab_size)
        nn.init.xavier_uniform_(self.head.weight)                                  # fairseq Linear()
        nn.init.zeros_(self.head.bias)
        if freeze_feature_encoder:                                                 # feature_grad_mult 0.0
            for p in encoder.feature_extractor.parameters():
                p.requires_grad_(False)

    @property
    def vocab_size(self) -> int:
        return self.head.out_features

    def apply_mask(self, x: torch.Tensor, frame_pad: torch.Tensor | None, seed: int) -> torch.Tensor:
        """Time spans -> mask_emb (at least 2 per utterance, as wav2vec2.py), channel spans -> 0."""
        B, T, C = x.shape
        rng = np.random.RandomState(seed & 0xFFFF_FFFF)
        lengths = [T] * B if frame_pad is None else (T - frame_pad.sum(1)).tolist()
        if self.mask_prob > 0:
            time = torch.from_numpy(span_mask((B, T), lengths, self.mask_prob, self.mask_length, 2, rng))
            x = torch.where(time.to(x.device)[..., None], self.mask_emb.to(x.dtype), x)         # (B, T, C)
        if self.mask_channel_prob > 0:
            chan = torch.from_numpy(span_mask((B, C), [C] * B, self.mask_channel_prob, self.mask_channel_length,
                                              0, rng))
            x = x.masked_fill(chan.to(x.device)[:, None, :], 0.0)                                # (B, T, C)
        return x

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, mask_seed: int | None = None,
                layer_seed: int | None = None, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training: `mask_seed` draws this rank's time/channel masks, `layer_seed` the layerdrop (the same
        on every rank: ZeRO-3 gathers the same blocks everywhere); `frozen`: the encoder runs without
        gradients (freeze_finetune_updates), only the head trains."""
        with torch.no_grad() if frozen else contextlib.nullcontext():
            feats, frame_pad = self.encoder.local_features(source, padding_mask)   # (B, T, D), (B, T) | None
            feats = feats.to(self.mask_emb.dtype)
            if frame_pad is not None:
                feats = feats.masked_fill(frame_pad[..., None], 0.0)              # (B, T, D)
            layer_keep = None
            if self.training and mask_seed is not None:
                feats = self.apply_mask(feats, frame_pad, mask_seed)
            if self.training and layer_seed is not None:
                layer_keep = self.encoder.draw_layerdrop(layer_seed)
            x, _ = self.encoder(feats, None, 1, frame_pad, layer_keep=layer_keep)  # (B, T, D)
        return self.head(self.final_dropout(x)), frame_pad                        # (B, T, V)

    @staticmethod
    def frame_lengths(logits: torch.Tensor, frame_pad: torch.Tensor | None) -> torch.Tensor:
        """(B,) int64 valid frames per utterance."""
        B, T, _ = logits.shape
        if frame_pad is None:
            return torch.full((B,), T, dtype=torch.int64)
        return (T - frame_pad.sum(1)).to(torch.int64).cpu()                       # (B,)
