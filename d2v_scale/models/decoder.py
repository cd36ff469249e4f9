"""The light convolutional decoders of data2vec 2.0 (fairseq `modules.py: Decoder1d, Decoder2d`).

The decoder input is the student's output at the visible positions with N(0, mask_noise_std^2)
noise tokens re-inserted at the masked ones (no learned mask token, no positions); the decoder
predicts a target at every position and the loss reads the masked ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Conv1dChannelsLast(nn.Conv1d):
    """nn.Conv1d (same parameters, same state dict) that reads its (B, C, T) input as a (B, C, 1, T)
    image: given the transposed view of a channels-last (B, T, C) tensor, the convolution runs in
    channels-last layout and writes channels-last, so no layout copy is made on either side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # (B, C, T), any strides
        y = F.conv2d(x.unsqueeze(2), self.weight.unsqueeze(2), self.bias, (1, self.stride[0]),
                     (0, self.padding[0]), (1, self.dilation[0]), self.groups)   # (B, C', 1, T')
        return y.squeeze(2)                                             # (B, C', T')


class ConvBlock(nn.Module):
    """Conv (1-D or 2-D, `groups`) -> LayerNorm over channels without affine -> GELU.

    Works on channels-last tensors (B, *spatial, C): the convolution reads them as NCHW views with
    channels-last strides, the LayerNorm runs over the contiguous last dim, and nothing is transposed
    into a copy (fairseq moves channels around each norm, which costs a layout copy per layer and a
    LayerNorm over a strided dim)."""

    def __init__(self, conv: nn.Module, dim: int):
        super().__init__()
        self.conv = conv
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # (B, *spatial, C)
        spatial = x.shape[1:-1]
        y = self.conv(x.movedim(-1, 1))                                 # (B, C', *spatial), channels-last
        if self.conv.kernel_size[0] % 2 == 0:                           # SamePad: drop the extra
            y = y[(..., *[slice(0, n) for n in spatial])]               # frame of even kernels
        y = F.layer_norm(y.movedim(1, -1), (self.dim,), eps=1e-5)       # (B, *spatial, C')
        return F.gelu(y)


class _Decoder(nn.Module):
    def __init__(self, cfg, embed_dim: int, conv_cls):
        super().__init__()
        d = cfg.decoder
        self.residual = d.decoder_residual
        self.input_dropout = nn.Dropout(d.input_dropout)
        self.blocks = nn.Sequential(*[
            ConvBlock(conv_cls(embed_dim if i == 0 else d.decoder_dim, d.decoder_dim, d.decoder_kernel,
                               padding=d.decoder_kernel // 2, groups=d.decoder_groups), d.decoder_dim)
            for i in range(d.decoder_layers)])
        if d.projection_layers == 1:
            self.proj = nn.Linear(d.decoder_dim, embed_dim)
        else:  # fairseq: Linear(dim -> dim*ratio), GELU, [Linear(..), GELU]*, Linear(-> D)
            layers, cur = [], d.decoder_dim
            for i in range(d.projection_layers - 1):
                nxt = int(cur * d.projection_ratio) if i == 0 else cur
                layers += [nn.Linear(cur, nxt), nn.GELU()]
                cur = nxt
            self.proj = nn.Sequential(*layers, nn.Linear(cur, embed_dim))

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for blk in self.blocks:
            x = blk(x)                                                  # (B, *spatial, C')
            if self.residual and residual.shape[-1] == x.shape[-1]:      # no residual where dims differ
                x = x + residual
            residual = x
        return x


class Decoder1d(_Decoder):
    """Audio/text decoder: Conv1d blocks over time."""

    def __init__(self, cfg, embed_dim: int):
        super().__init__(cfg, embed_dim, Conv1dChannelsLast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # (B*M, T, D)
        return self.proj(self.run_blocks(x))                            # (B*M, T, C') -> (B*M, T, D)


class Decoder2d(_Decoder):
    """Image decoder: Conv2d blocks over the (h, w) patch grid, projection per token."""

    def __init__(self, cfg, embed_dim: int, grid: tuple[int, int]):
        super().__init__(cfg, embed_dim, nn.Conv2d)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # (B*M, T, D)
        B, T, C = x.shape
        x = self.run_blocks(x.reshape(B, *self.grid, C))                # (B*M, h, w, C')
        return self.proj(x.reshape(B, T, x.shape[-1]))                  # (B*M, T, D)
