"""AudioEncoder: the data2vec 2.0 speech encoder (fairseq `modalities/audio.py: AudioEncoder`).

Waveform -> wav2vec 2.0 CNN in layer-norm mode (torchaudio's ConvLayerBlock, conv bias off, its
LayerNorm computed in fp32 like fairseq's Fp32LayerNorm) -> LayerNorm + Linear to D (the local
features, computed once per sample; the teacher reuses them). Then convolutional relative positions
run on the full-length sequence with the masked frames zeroed and are added to the visible frames,
an ALiBi bias with a learned per-head scale is built for the kept positions only, the embedding
LayerNorm, dropout, prenet and shared blocks. The front end (CNN, positional convs, `local_features`)
is the data2vec 1 speech encoder's too (wav2vec2.py).
"""
from __future__ import annotations

import ast
import math

import torch
from torch import nn
from torchaudio.models.wav2vec2.components import ConvLayerBlock, FeatureExtractor
from torchaudio.models.wav2vec2.components import LayerNorm as TransposedLayerNorm

from .decoder import Conv1dChannelsLast, ConvBlock
from .transformer import Encoder


def parse_conv_spec(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `feature_encoder_spec` ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...") without eval()."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts] if isinstance(node, ast.List) else tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported element in feature_encoder_spec: {ast.dump(node)}")
    layers = ev(ast.parse(spec, mode="eval"))
    if not layers or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(f"feature_encoder_spec {spec!r} must be a list of (channels, kernel, stride)")
    return layers


def conv_layers_out(spec: str, n_samples: int) -> list[tuple[int, int, int, int]]:
    """[(c_in, c_out, kernel, frames_out)] for `n_samples` input samples."""
    out, cin, n = [], 1, n_samples
    for c, k, s in parse_conv_spec(spec):
        n = (n - k) // s + 1
        out.append((cin, c, k, n))
        cin = c
    return out


def frames_for(spec: str, n_samples: int) -> int:
    return conv_layers_out(spec, n_samples)[-1][3]


def frames_padded(spec: str, padding_mask: torch.Tensor | None) -> bool:
    """Whether a (B, S) sample padding mask (True = pad; a host tensor, read here) pads any frame of
    the CNN's output: the shortest row's frame count, by the CNN's own length rule (torchaudio's
    `ConvLayerBlock`: floor((n - k) / s) + 1, never below 0), under the full length's."""
    if padding_mask is None:
        return False
    n, full = int((~padding_mask.cpu().numpy()).sum(-1).min()), frames_for(spec, padding_mask.shape[-1])
    for _, k, s in parse_conv_spec(spec):
        n = max(0, (n - k) // s + 1)
    return n < full


def frame_padding(lengths: torch.Tensor | None, frames: int, padded: bool | None) -> torch.Tensor | None:
    """(B, T) frame padding mask (True = pad) from the CNN's frame lengths (B,), or None: no lengths,
    or `padded` None and no length short of `frames` (read back: a host wait on a GPU)."""
    if lengths is None or (padded is None and not bool((lengths < frames).any())):
        return None
    return torch.arange(frames, device=lengths.device)[None] >= lengths[:, None]   # (B, T)


class Fp32LayerNorm(TransposedLayerNorm):
    """torchaudio's channel LayerNorm computed in fp32 (fairseq `Fp32LayerNorm`), same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.layer_norm(x.transpose(-2, -1).float(), self.normalized_shape, self.weight.float(),
                                     self.bias.float(), self.eps)
        return y.transpose(-2, -1).to(x.dtype)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's geometric slopes; for a non-power-of-two head count the closest lower power of two
    plus every other slope of the doubled set (fairseq `get_alibi`)."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(heads).is_integer():
        return pow2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return pow2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


class GradMultiply(torch.autograd.Function):
    """fairseq GradMultiply: identity forward, gradient x scale backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def conv_feature_extractor(spec: str, bias: bool) -> tuple[FeatureExtractor, int]:
    """The wav2vec 2.0 CNN in layer-norm mode (fp32 channel LayerNorm) and its output channels."""
    layers, cin = [], 1
    for c, k, s in parse_conv_spec(spec):
        layers.append(ConvLayerBlock(cin, c, k, s, bias=bias, layer_norm=Fp32LayerNorm(c, elementwise_affine=True)))
        cin = c
    return FeatureExtractor(nn.ModuleList(layers)), cin


def positional_convs(a, D: int) -> nn.ModuleList:
    """data2vec's multi-layer positional conv: conv_pos_depth x [grouped conv, LayerNorm, GELU], kernel
    max(3, conv_pos_width // conv_pos_depth)."""
    k = max(3, a.conv_pos_width // a.conv_pos_depth)
    return nn.ModuleList([ConvBlock(Conv1dChannelsLast(D, D, k, padding=k // 2, groups=a.conv_pos_groups), D)
                          for _ in range(a.conv_pos_depth)])


class WaveformFeatures:
    """What both speech encoders (data2vec 2.0's and wav2vec 2.0's) do before their Transformer:
    waveform -> frames (`spec`, `feature_extractor`, `feature_norm`, `feature_proj`, set by the encoder)."""
    spec: str
    feature_grad_mult = 1.0      # wav2vec 2.0: the CNN's gradient scale (0: frozen)

    def num_frames(self, n_samples: int) -> int:
        return frames_for(self.spec, n_samples)

    def token_shape(self, source: torch.Tensor, padding_mask=None) -> tuple[int]:
        return (self.num_frames(source.shape[-1]),)

    def has_padding(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> bool:
        return frames_padded(self.spec, padding_mask)

    def local_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                       padded: bool | None = None):
        """(B, S) waveform -> (B, T, D) features, (B, T) frame padding mask (True = pad) or None:
        None when `padded` is False (decided on the host), or, `padded` None, when no frame length read
        back is short (a host wait on a GPU)."""
        lengths = None if padding_mask is None or padded is False else (~padding_mask).sum(-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.feature_grad_mult > 0):
            x, lengths = self.feature_extractor(source, lengths)           # (B, T, C)
        if self.feature_grad_mult > 0 and self.feature_grad_mult != 1.0:
            x = GradMultiply.apply(x, self.feature_grad_mult)
        x = self.feature_proj(self.feature_norm(x))                         # (B, T, D)
        return x, frame_padding(lengths, x.shape[1], padded)


class AudioEncoder(WaveformFeatures, Encoder):
    local_modules = ("feature_extractor", "feature_norm", "feature_proj")
    ema_local_encoder = False   # the teacher runs on the student's CNN features (fairseq ema_local_encoder=False)

    def __init__(self, cfg):
        super().__init__(cfg)
        a, D = cfg.audio, cfg.embed_dim
        self.spec = a.feature_encoder_spec
        self.feature_extractor, cin = conv_feature_extractor(a.feature_encoder_spec, bias=False)
        self.feature_norm = nn.LayerNorm(cin)                               # eps 1e-5 (nn.LayerNorm default)
        self.feature_proj = nn.Linear(cin, D)
        self.pos_conv = positional_convs(a, D)
        self.num_heads = cfg.num_heads
        if a.use_alibi:
            self.alibi_scale = nn.Parameter(torch.ones(1, 1, cfg.num_heads, 1, 1))
            self.register_buffer("slopes", torch.tensor(alibi_slopes(cfg.num_heads)), persistent=False)
        else:
            self.alibi_scale = None
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.pre_drop = nn.Dropout(cfg.prenet_dropout)

    def reset_parameters(self) -> None:
        self.feature_proj.reset_parameters()   # fairseq resets project_features' Linear after BERT init

    def _alibi(self, pos: torch.Tensor, dtype) -> torch.Tensor | None:
        """-|p_i - p_j| * slope_h * clamp(scale_h, 0) for the kept positions pos (B', N) -> (B', H, N, N)."""
        if self.alibi_scale is None:
            return None
        dist = (pos[:, :, None] - pos[:, None, :]).abs().float()           # (B', N, N)
        scale = self.slopes * self.alibi_scale.view(-1).clamp_min(0)        # (H,)
        return -dist[:, None] * scale[None, :, None, None]                  # (B', H, N, N) fp32

    def embed(self, feats, ids_keep, clones, padding_mask):
        B, T, D = feats.shape
        x = feats.repeat_interleave(clones, dim=0) if clones > 1 else feats  # (B*M, T, D)
        if ids_keep is None:                                                  # teacher / feature extraction
            x = x + self._pos(x)
            pos = torch.arange(T, device=x.device).expand(x.shape[0], T)
        else:
            keep = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
            keep.scatter_(1, ids_keep, 1.0)                                   # 1 = visible
            x_pos = self._pos(x * keep[..., None])                            # masked frames zeroed, full length
            idx = ids_keep[..., None].expand(-1, -1, D)
            x = torch.gather(x, 1, idx) + torch.gather(x_pos, 1, idx)        # (B*M, T_keep, D)
            pos = ids_keep
            if padding_mask is not None:                                      # kept even if no kept frame pads:
                padding_mask = torch.gather(padding_mask, 1, ids_keep)        # asking would wait (B*M, T_keep)
        bias = self._alibi(pos, x.dtype)
        return self.pre_drop(self.norm_pre(x)), bias, padding_mask

    def _pos(self, x: torch.Tensor) -> torch.Tensor:                         # (B, T, D)
        for blk in self.pos_conv:
            x = blk(x)                                                        # (B, T, D), channels-last
        return x
