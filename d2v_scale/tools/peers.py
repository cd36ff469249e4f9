"""The models `d2v bench step --compare` times beside the data2vec 2.0 step, in the same process.

* `timm`: a plain supervised timm ViT of the student's width, depth and patch (`vit_huge_patch14` ->
  the shape of timm's `vit_huge_patch14_224`), cross-entropy over 1000 classes, bf16 autocast on a
  GPU, fused AdamW; for audio and text, timm `Block`s of the same width and depth on the same number
  of tokens (the tokens given as inputs, a mean-pooled linear head).
(`--compare d2v1` builds the real data2vec 1 model, d2v1/, through the engine: bench_step.py.)
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..models import token_grid

NUM_CLASSES = 1000


class TokenTransformer(nn.Module):
    """timm Blocks over (B, N, D) input tokens + final LayerNorm + mean pool + linear head."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                   # (B, N, D)
        return self.head(self.norm(self.blocks(x)).mean(1))                 # (B, classes)


_TIMM_SIZES = {(768, 12, 12): "base", (1024, 24, 16): "large", (1280, 32, 16): "huge"}   # (dim, depth, heads)


def timm_name(cfg) -> str:
    """The registered timm model of this shape (e.g. vit_huge_patch14_224), else a description."""
    m = cfg.model
    depth = m.prenet_depth + m.depth
    if m.modality == "image":
        size = _TIMM_SIZES.get((m.embed_dim, depth, m.num_heads))
        name = f"vit_{size}_patch{m.image.patch_size}_{m.image.img_size}"
        if size and name in timm.list_models():
            return name
        return f"timm VisionTransformer(embed_dim={m.embed_dim}, depth={depth}, heads={m.num_heads}, patch={m.image.patch_size})"
    return f"timm Blocks(dim={m.embed_dim}, depth={depth}, heads={m.num_heads}) on {math.prod(token_grid(cfg))} tokens"


def timm_peer(cfg) -> nn.Module:
    m = cfg.model
    depth = m.prenet_depth + m.depth
    if m.modality == "image":
        return VisionTransformer(img_size=m.image.img_size, patch_size=m.image.patch_size, in_chans=m.image.in_chans,
                                 num_classes=NUM_CLASSES, embed_dim=m.embed_dim, depth=depth, num_heads=m.num_heads,
                                 mlp_ratio=m.mlp_ratio)
    return TokenTransformer(m.embed_dim, depth, m.num_heads, m.mlp_ratio)


def peer_batch(cfg, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for the peer: images, or (B, N, D) tokens of the student's token count."""
    m = cfg.model
    if m.modality == "image":
        x = torch.randn(batch_size, m.image.in_chans, m.image.img_size, m.image.img_size, device=device)
    else:
        x = torch.randn(batch_size, math.prod(token_grid(cfg)), m.embed_dim, device=device)
    return x, torch.randint(0, NUM_CLASSES, (batch_size,), device=device)


class PeerStep:
    """One supervised step of the peer: forward under autocast (bf16 on a GPU), cross-entropy,
    backward, AdamW (fused on a GPU)."""

    def __init__(self, model: nn.Module, device: torch.device, lr: float = 1e-4):
        self.model = model.to(device).train()
        self.device = device
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda" or None)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = F.cross_entropy(self.model(x), labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
