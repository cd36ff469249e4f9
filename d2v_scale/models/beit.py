"""BeitEncoder: the data2vec 1 vision encoder (fairseq `examples/data2vec/models/data2vec_vision.py`,
BEiT's code as data2vec_vision uses it; Hugging Face `Data2VecVisionModel`).

Patch conv -> the masked patches replaced by a learned `mask_token` -> CLS token first -> optional
learned absolute positions -> pre-norm blocks with layer scale (`gamma_1`, `gamma_2`) and a
relative position bias (one table shared by every block, or one per block) -> final LayerNorm.
Names follow timm's `beit.py` (`patch_embed.proj`, `cls_token`, `rel_pos_bias`, `attn.q_bias`,
`attn.v_bias`, `gamma_1`, ...); the key projection has no bias, as in BEiT.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, Mlp, PatchEmbed

from .data2vec1 import Data2Vec1Encoder


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """(N+1, N+1) index into a ((2h-1)(2w-1) + 3)-row table: patch pairs by their (dy, dx), then
    the three CLS rows (CLS->patch, patch->CLS, CLS->CLS), as BEiT lays them out."""
    h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)                   # (N, N, 2)
    n_rel = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros((h * w + 1,) * 2, dtype=torch.long)                            # (N+1, N+1)
    index[1:, 1:] = (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1
    index[0, :] = n_rel - 3
    index[:, 0] = n_rel - 2
    index[0, 0] = n_rel - 1
    return index


class RelativePositionBias(nn.Module):
    """A learned (num_relative_distance, H) table read out as an (H, N+1, N+1) attention bias."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid = grid
        n_rel = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        N = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, H)
        return bias.view(N, N, -1).permute(2, 0, 1)                                     # (H, N, N)


class BeitAttention(nn.Module):
    """Fused qkv weight without bias plus separate `q_bias`, `v_bias` (the key has none)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if grid else None   # per-block table
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # (3D,)
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(B, N, 3, self.num_heads, -1)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                     # 3 x (B, H, N, hd)
        if self.rel_pos_bias is not None:
            own = self.rel_pos_bias()[None]                                                 # (1, H, N, N)
            bias = own if bias is None else bias + own
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)                                              # (B, N, D)
        return self.proj_drop(self.proj(x))


class BeitBlock(nn.Module):
    """Pre-norm: `x = x + dp(gamma_1 * attn(norm1(x))); ffn = dp(gamma_2 * mlp(norm2(x))); x = x + ffn`.
    Returns `(x, ffn)`: `ffn` is the reference's `fc_feature` (drop path and layer scale included)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, init_values: float,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = BeitAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop, grid=grid)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=(0.0, drop))
        if init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn(self.norm1(x), bias)                                                  # (B, N, D)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        ffn = self.mlp(self.norm2(x))                                                       # (B, N, D)
        ffn = self.drop_path(ffn if self.gamma_2 is None else self.gamma_2 * ffn)
        return x + ffn, ffn


class BeitEncoder(Data2Vec1Encoder):
    num_extra_tokens = 1
    local_modules = ("patch_embed",)
    ema_local_encoder = True    # data2vec_vision's teacher is an EMA of the whole model, patch embedding included

    def __init__(self, cfg):
        ic, D = cfg.image, cfg.embed_dim
        grid = (ic.img_size // ic.patch_size,) * 2
        lo, hi, n = cfg.start_drop_path_rate, cfg.end_drop_path_rate, cfg.depth
        blocks = [BeitBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, ic.layer_scale_init_value,
                            drop=cfg.encoder_dropout, attn_drop=cfg.attention_dropout,
                            drop_path=lo + (hi - lo) * i / max(1, n - 1),
                            grid=None if ic.shared_rel_pos_bias else grid) for i in range(n)]
        super().__init__(cfg, blocks)
        self.patch_embed = PatchEmbed(ic.img_size, ic.patch_size, ic.in_chans, D)
        self.grid = tuple(self.patch_embed.grid_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, D)) if ic.abs_pos_emb else None
        self.pos_drop = nn.Dropout(cfg.encoder_dropout)
        self.rel_pos_bias = RelativePositionBias(self.grid, cfg.num_heads) if ic.shared_rel_pos_bias else None
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if ic.final_norm else nn.Identity()

    def reset_parameters(self) -> None:
        """data2vec_vision's init (`beit/modeling_cyclical.py`) over the whole encoder: N(0, 0.02)
        truncated at one std for Linear/conv weights and tokens, zero biases, unit LayerNorms, layer
        scale at its start value, the attention and FFN output projections of block i divided by
        sqrt(2 (i + 1)); relative position tables stay zero."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, a=-0.02, b=0.02)
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def token_shape(self, source: torch.Tensor, padding_mask=None) -> tuple[int, int]:
        return self.grid

    def local_features(self, source: torch.Tensor, padding_mask=None, padded=None):
        return self.patch_embed(source), None                                               # (B, T, D)

    def embed(self, feats, mask, clones, padding_mask):
        x = feats.repeat_interleave(clones, dim=0) if clones > 1 else feats                 # (B*M, T, D)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)                                              # (B*M, T, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)   # (B*M, 1+T, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        bias = self.rel_pos_bias()[None] if self.rel_pos_bias is not None else None        # (1, H, 1+T, 1+T)
        return self.pos_drop(x), bias, None
