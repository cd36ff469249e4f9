"""Wav2Vec2Encoder: the data2vec 1 speech encoder (fairseq `examples/data2vec/models/data2vec_audio.py`
on `fairseq/models/wav2vec/wav2vec2.py: ConvFeatureExtractionModel, TransformerEncoder`;
Hugging Face `Data2VecAudioModel`).

Local features: the wav2vec 2.0 CNN in layer-norm mode (the data2vec 2.0 audio pieces: torchaudio
ConvLayerBlock with an fp32 channel LayerNorm) -> LayerNorm -> `post_extract_proj` to D (computed
once per sample: fairseq's teacher reads these `pre_encoder_features`). Then `dropout_input`, the
masked frames replaced by the learned `mask_emb`, padded frames zeroed, the multi-layer positional
conv of data2vec audio (`pos_conv_depth` x [grouped conv, SamePad, LayerNorm without affine, GELU],
kernel max(3, conv_pos // depth)) added, the encoder LayerNorm and dropout, and post-norm blocks
(`layer_norm_first=False`). No LayerNorm after the last block.
"""
from __future__ import annotations

import torch
from torch import nn

from .audio import WaveformFeatures, conv_feature_extractor, positional_convs
from .data2vec1 import Data2Vec1Encoder, post_norm_blocks


class Wav2Vec2Encoder(WaveformFeatures, Data2Vec1Encoder):
    local_modules = ("feature_extractor", "feature_norm", "feature_proj")
    ema_local_encoder = False   # fairseq ema_transformer_only: the teacher reads the student's pre_encoder_features

    def __init__(self, cfg):
        super().__init__(cfg, post_norm_blocks(cfg))
        a, D = cfg.audio, cfg.embed_dim
        self.spec = a.feature_encoder_spec
        self.feature_grad_mult = a.feature_grad_mult
        self.feature_extractor, cin = conv_feature_extractor(a.feature_encoder_spec, bias=a.conv_bias)
        self.feature_norm = nn.LayerNorm(cin, eps=cfg.norm_eps)
        self.feature_proj = nn.Linear(cin, D)                               # fairseq post_extract_proj
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.mask_emb = nn.Parameter(torch.zeros(D))
        self.pos_conv = positional_convs(a, D)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps)                  # fairseq encoder.layer_norm
        self.pre_drop = nn.Dropout(cfg.encoder_dropout)

    def reset_parameters(self) -> None:
        """wav2vec 2.0's init: BERT init of the Transformer's Linears (N(0, 0.02), zero bias; fairseq
        applies it to `TransformerEncoder` only), Kaiming-normal CNN kernels, `post_extract_proj`
        and the positional convs at PyTorch's default, mask_emb U(0, 1)."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.feature_proj.reset_parameters()
        for blk in self.feature_extractor.conv_layers:
            nn.init.kaiming_normal_(blk.conv.weight)
        for blk in self.pos_conv:
            blk.conv.reset_parameters()
        nn.init.uniform_(self.mask_emb)

    def embed(self, feats, mask, clones, padding_mask):
        x = feats.repeat_interleave(clones, dim=0) if clones > 1 else feats  # (B*M, T, D)
        if clones > 1 and padding_mask is not None:
            padding_mask = padding_mask.repeat_interleave(clones, dim=0)      # (B*M, T)
        x = self.dropout_input(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)  # (B*M, T, D)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        pos = x
        for blk in self.pos_conv:
            pos = blk(pos)                                                    # (B*M, T, D), channels-last
        x = self.pre_drop(self.norm_pre(x + pos))
        return x, None, padding_mask
