"""Encoders and decoders, one file per modality; nothing here imports DeepSpeed or the trainer."""
from __future__ import annotations

from .audio import AudioEncoder, frames_for
from .beit import BeitEncoder
from .classifier import Classifier
from .data2vec1 import BlockResult, Data2Vec1Encoder
from .decoder import Decoder1d, Decoder2d
from .image import ImageEncoder
from .sentence import SentenceClassifier
from .roberta import RobertaEncoder
from .text import TextEncoder
from .transformer import Block, Encoder, finetune_drop_path, pool_tokens
from .wav2vec2 import Wav2Vec2Encoder

ENCODERS: dict[str, type[Encoder]] = {"image": ImageEncoder, "audio": AudioEncoder, "text": TextEncoder}
# data2vec 1 (model.algorithm=data2vec): BEiT, wav2vec 2.0 and RoBERTa encoders
ENCODERS_V1: dict[str, type[Data2Vec1Encoder]] = {"image": BeitEncoder, "audio": Wav2Vec2Encoder,
                                                  "text": RobertaEncoder}


def encoder_class(cfg) -> type[Encoder]:
    """cfg: ModelConfig. Picked by `cfg.algorithm` (data2vec2 | data2vec) and `cfg.modality`."""
    table = ENCODERS_V1 if getattr(cfg, "algorithm", "data2vec2") == "data2vec" else ENCODERS
    if cfg.modality not in table:
        raise ValueError(f"unknown modality {cfg.modality!r}")
    return table[cfg.modality]


def build_encoder(cfg) -> Encoder:
    """cfg: ModelConfig. The encoder class is picked by `cfg.algorithm` and `cfg.modality`."""
    return encoder_class(cfg)(cfg)


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


__all__ = ["ENCODERS", "ENCODERS_V1", "BeitEncoder", "Block", "BlockResult", "Classifier", "Data2Vec1Encoder",
           "Encoder", "RobertaEncoder", "Wav2Vec2Encoder", "encoder_class", "Decoder1d", "Decoder2d", "SentenceClassifier",
           "build_encoder", "build_decoder", "finetune_drop_path", "pool_tokens", "token_grid"]
