"""ImageEncoder: the data2vec 2.0 ViT (fairseq `modalities/images.py: ImageEncoder`).

timm `PatchEmbed` (Xavier-uniform kernel), fixed 2-D sin-cos positions (MAE recipe, none on the
CLS token) added before cloning and masking, one N(0, 1) CLS token, the embedding LayerNorm
(`norm_pre`, fairseq `context_encoder.norm`), prenet blocks and shared blocks, no final norm.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import PatchEmbed

from .transformer import Encoder


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(1, h*w, dim) MAE sin-cos table: first half encodes the column, second half the row (fp64 math)."""
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))   # (D/4,)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)                               # (h*w,)
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)                    # (h*w,)

    def one(pos):
        out = pos[:, None] * omega[None]                                                  # (h*w, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)                                   # (h*w, D/2)

    return torch.cat([one(cols), one(rows)], dim=1).float()[None]                         # (1, h*w, D)


class ImageEncoder(Encoder):
    num_extra_tokens = 1
    local_modules = ("patch_embed",)
    ema_local_encoder = True  # the teacher embeds the clean image with its own EMA patch conv

    def __init__(self, cfg):
        super().__init__(cfg)
        ic = cfg.image
        D = cfg.embed_dim
        if D % 4:
            raise ValueError(f"model.embed_dim={D} must be divisible by 4 for the 2-D sin-cos table")
        self.patch_embed = PatchEmbed(ic.img_size, ic.patch_size, ic.in_chans, D)
        self.grid = tuple(self.patch_embed.grid_size)
        self.register_buffer("pos_embed", sincos_2d(D, self.grid), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.pre_drop = nn.Dropout(cfg.prenet_dropout)

    def reset_parameters(self) -> None:
        """After the model-wide BERT init: Xavier patch kernel, N(0, 1) CLS (`init_extra_token_zero=False`)."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=1.0)

    def token_shape(self, source: torch.Tensor, padding_mask=None) -> tuple[int, int]:
        return self.grid

    def local_features(self, source: torch.Tensor, padding_mask=None, padded=None):
        return self.patch_embed(source), None                                   # (B, T, D)

    def embed(self, feats, ids_keep, clones, padding_mask):
        x = feats + self.pos_embed.to(feats.dtype)                                # (B, T, D)
        if clones > 1:
            x = x.repeat_interleave(clones, dim=0)                                # (B*M, T, D)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B*M, T_keep, D)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return self.pre_drop(self.norm_pre(x)), None, None                       # (B*M, 1+T_keep, D)
