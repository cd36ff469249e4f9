"""Encoders and decoders, one file per modality; nothing here imports DeepSpeed or the trainer."""
from __future__ import annotations

from .decoder import Decoder1d, Decoder2d
from .transformer import Block, Encoder


def build_encoder(cfg) -> Encoder:
    """cfg: ModelConfig. The encoder class is picked by `cfg.modality` (image | audio | text)."""
    if cfg.modality == "image":
        from .image import ImageEncoder
        return ImageEncoder(cfg)
    if cfg.modality == "audio":
        from .audio import AudioEncoder
        return AudioEncoder(cfg)
    if cfg.modality == "text":
        from .text import TextEncoder
        return TextEncoder(cfg)
    raise ValueError(f"unknown modality {cfg.modality!r}")


def build_decoder(cfg, encoder: Encoder):
    if cfg.modality == "image":
        return Decoder2d(cfg, cfg.embed_dim, encoder.grid)
    return Decoder1d(cfg, cfg.embed_dim)


__all__ = ["Block", "Encoder", "Decoder1d", "Decoder2d", "build_encoder", "build_decoder"]
