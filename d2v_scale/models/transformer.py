"""Post-LN transformer block and the encoder skeleton shared by every modality.

Mirrors fairseq `examples/data2vec/models/modalities/modules.py: AltBlock, AltAttention` with
`layer_norm_first=False` (all released data2vec 2.0 configs). Attribute names follow timm
(`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) so state dicts read familiarly,
but the math is BERT-style post-LN, so these weights do NOT drop into timm's pre-norm `Block`.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, Mlp


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (flash/mem-efficient on GPU).

    `bias` is an additive float bias (ALiBi, (B, H, N, N)); `padding_mask` is (B, N) bool, True = pad.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, f"embed_dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # 3 x (B, H, N, hd)
        attn_mask = None
        if bias is not None:
            attn_mask = bias.to(q.dtype)                                          # (B, H, N, N)
        if padding_mask is not None:
            pad = torch.zeros(padding_mask.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(padding_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, N)
            attn_mask = pad if attn_mask is None else attn_mask + pad
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)                                    # (B, N, D)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Post-LN block: `h = LN1(x + attn(x)); out = LN2(h + mlp(h))`.

    Returns `(out, ffn_out)`: `ffn_out` is the MLP output before the residual and before LN2, the
    "layer result" data2vec 2.0 regresses (fairseq `end_of_block_targets=False`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, mlp_drop: float = 0.0,
                 post_mlp_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=mlp_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.post_mlp_dropout = nn.Dropout(post_mlp_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm1(x + self.drop_path(self.attn(x, bias, padding_mask)))
        ffn = self.mlp(x)                                                         # (B, N, D) target
        x = self.norm2(x + self.drop_path(self.post_mlp_dropout(ffn)))
        return x, ffn


def pool_tokens(x: torch.Tensor, how: str, num_extra: int, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, E+T, D) encoder tokens -> (B, D): `mean` of the T input tokens (extra tokens and padding
    left out, fairseq MEAN_POOLING) or the `cls` token (MAE's and BEiT's other choice)."""
    if how == "cls":
        if num_extra == 0:
            raise ValueError("this encoder has no CLS token: pool with how='mean'")
        return x[:, 0]                                                            # (B, D)
    if how != "mean":
        raise ValueError(f"pool how={how!r}: mean or cls")
    tokens = x[:, num_extra:]                                                     # (B, T, D)
    if padding_mask is None:
        return tokens.mean(1)
    keep = (~padding_mask).unsqueeze(-1).to(tokens.dtype)                         # (B, T, 1)
    return (tokens * keep).sum(1) / keep.sum(1).clamp_min(1)                      # (B, D)


def finetune_drop_path(depth: int, prenet_depth: int, rate: float) -> list[float]:
    """fairseq `mae_image_classification.py`: a linear 0 -> rate ramp over the *shared* depth; the
    prenet blocks ramp from its first value to the value at index prenet_depth - 1, the shared
    blocks from the value at index prenet_depth to the last (prenet first, as in `blocks`)."""
    dpr = [rate * i / max(1, depth - 1) for i in range(depth)]
    prenet = [dpr[0] + (max(0.0, dpr[min(prenet_depth, depth) - 1]) - dpr[0]) * i / max(1, prenet_depth - 1)
              for i in range(prenet_depth)] if prenet_depth else []
    lo, hi = dpr[min(prenet_depth, depth - 1)], dpr[-1]
    return prenet + [lo + (hi - lo) * i / max(1, depth - 1) for i in range(depth)]


def build_blocks(cfg, n: int, drop_path: tuple[float, float], first_index: int = 0) -> list[Block]:
    """`n` blocks with a linear drop-path ramp (fairseq ramps prenet and shared blocks separately)."""
    lo, hi = drop_path
    rates = [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]
    return [Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps,
                  attn_drop=cfg.attention_dropout, proj_drop=cfg.encoder_dropout,
                  mlp_drop=cfg.activation_dropout, post_mlp_drop=cfg.post_mlp_drop, drop_path=r)
            for r in rates]


class Encoder(nn.Module):
    """Modality encoder: `local_features` (patch conv / CNN / embeddings) + `embed` + blocks.

    Subclasses implement
      * `local_features(source, padding_mask, padded) -> (feats (B, T, D), frame_padding_mask | None)`,
        computed once per sample (the teacher of audio/text reuses the student's); `padded` is
        `has_padding`'s answer (the training step's), or None to find it out from the tensors (a wait
        on a GPU: evaluation, fine-tuning);
      * `has_padding(source, padding_mask) -> bool`: whether any token of a batch is padding, read
        from the host tensors the loader made (free there), so the step never asks the device;
      * `embed(feats, ids_keep, clones, padding_mask) -> (x, bias, padding_mask)`: positions,
        cloning x`clones` (sample-major), keeping the visible tokens `ids_keep` (B*M, T_keep),
        extra (CLS) tokens and the embedding LayerNorm/dropout;
      * `token_shape(source) -> tuple`: the token grid the mask is drawn on ((h, w) or (T,)).
    `blocks` holds the `num_prenet` modality blocks first, then the shared blocks; layer results
    (targets) come from the shared blocks only, extra tokens removed.
    """

    num_extra_tokens: int = 0
    local_modules: tuple[str, ...] = ()   # attributes that make up `local_features`
    ema_local_encoder: bool = True        # False: the teacher reuses the student's local features
    decoder_default_init: bool = True     # PyTorch default init for the decoder projection (not text)
    grad_checkpointing: bool = False

    def __init__(self, cfg):
        super().__init__()
        self.num_prenet = cfg.prenet_depth
        self.blocks = nn.ModuleList(
            build_blocks(cfg, cfg.prenet_depth, (cfg.prenet_drop_path_rate, cfg.prenet_drop_path_rate))
            + build_blocks(cfg, cfg.depth, (cfg.start_drop_path_rate, cfg.end_drop_path_rate)))
        self.layerdrop = [cfg.prenet_layerdrop] * cfg.prenet_depth + [cfg.layerdrop] * cfg.depth
        self.dropout_input = nn.Dropout(cfg.dropout_input)

    def reset_parameters(self) -> None:
        """Modality-specific init applied after the model-wide BERT init."""

    def token_shape(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[int, ...]:
        """The token grid masks are drawn on: (h, w) for images, (T,) for audio and text."""
        raise NotImplementedError

    def has_padding(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> bool:
        """Whether a batch (its host tensors, as the loader made them) has a padded token: images never."""
        return False

    def draw_layerdrop(self, seed: int) -> list[bool] | None:
        """Which blocks run this step (None: all). Drawn from a seed shared by every rank, so that
        ZeRO-3 gathers the same parameters everywhere (per-rank draws would deadlock)."""
        if not self.training or not any(p > 0 for p in self.layerdrop):
            return None
        rng = random.Random(seed)
        return [rng.random() >= p for p in self.layerdrop]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_drop_path(self, rates: list[float]) -> None:
        """Stochastic depth per block (fine-tuning sets its own ramp, see `finetune_drop_path`)."""
        if len(rates) != len(self.blocks):
            raise ValueError(f"{len(rates)} drop-path rates for {len(self.blocks)} blocks")
        for blk, r in zip(self.blocks, rates):
            blk.drop_path = DropPath(r) if r > 0 else nn.Identity()

    def extract_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                         local: "Encoder | None" = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens of the full, unmasked input, as fairseq `extract_features(mask=False)`:
        (B, extra+T, D) and the token padding mask (B, T) or None. `local` supplies `local_features`
        for an encoder without its own (an audio or text teacher runs on the student's)."""
        feats, padding_mask = (local or self).local_features(source, padding_mask)   # (B, T, D)
        dtype = next(self.parameters()).dtype
        x, _ = self(feats.to(dtype), None, 1, padding_mask)                         # (B, E+T, D)
        return x, padding_mask

    def forward(self, feats: torch.Tensor, ids_keep: torch.Tensor | None = None, clones: int = 1,
                padding_mask: torch.Tensor | None = None, return_layers: bool = False,
                layer_keep: list[bool] | None = None):
        """feats (B, T, D) from `local_features` -> (x (B*M, extra+T_keep, D), [shared layer results])."""
        x, bias, padding_mask = self.embed(feats, ids_keep, clones, padding_mask)
        layers = []
        for i, blk in enumerate(self.blocks):
            if i == self.num_prenet:
                x = self.dropout_input(x)
            if layer_keep is not None and not layer_keep[i]:
                continue  # layerdrop: the same decision on every rank (drawn from a shared seed)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, ffn = checkpoint(blk, x, bias, padding_mask, use_reentrant=False)
            else:
                x, ffn = blk(x, bias, padding_mask)
            if return_layers and i >= self.num_prenet:
                layers.append(ffn[:, self.num_extra_tokens:])                    # (B, T, D)
        return x, layers
