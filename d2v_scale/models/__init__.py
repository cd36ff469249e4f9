"""Encoders and decoders, one file per modality; nothing here imports DeepSpeed or the trainer."""
from __future__ import annotations

from .audio import AudioEncoder, frames_for
from .classifier import Classifier
from .decoder import Decoder1d, Decoder2d
from .image import ImageEncoder
from .sentence import SentenceClassifier
from .text import TextEncoder
from .transformer import Block, Encoder, finetune_drop_path, pool_tokens

ENCODERS: dict[str, type[Encoder]] = {"image": ImageEncoder, "audio": AudioEncoder, "text": TextEncoder}


def build_encoder(cfg) -> Encoder:
    """cfg: ModelConfig. The encoder class is picked by `cfg.modality` (image | audio | text)."""
    if cfg.modality not in ENCODERS:
        raise ValueError(f"unknown modality {cfg.modality!r}")
    return ENCODERS[cfg.modality](cfg)


def build_decoder(cfg, encoder: Encoder):
    if cfg.modality == "image":
        return Decoder2d(cfg, cfg.embed_dim, encoder.grid)
    return Decoder1d(cfg, cfg.embed_dim)


def token_grid(cfg, samples: int | None = None) -> tuple[int, ...]:
    """The token grid masks are drawn on, for a root Config (model + data settings): (h, w) patches,
    (T,) audio frames of `samples` waveform samples (default: data.max_sample_size), (T,) text tokens."""
    m = cfg.model
    if m.modality == "image":
        return (m.image.img_size // m.image.patch_size,) * 2
    if m.modality == "audio":
        return (frames_for(m.audio.feature_encoder_spec, samples or cfg.data.max_sample_size),)
    return (cfg.data.tokens_per_sample,)


__all__ = ["ENCODERS", "Block", "Classifier", "Encoder", "Decoder1d", "Decoder2d", "SentenceClassifier",
           "build_encoder", "build_decoder", "finetune_drop_path", "pool_tokens", "token_grid"]
