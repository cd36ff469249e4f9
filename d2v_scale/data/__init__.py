"""build_loader: shards -> dict batches (`source`, optional `padding_mask`) for one rank.

One codec per modality (`ImageCodec`, `AudioCodec`, `TextCodec`): `decode` a sample in the loader's
workers, `collate` a batch, and make a `synthetic` batch of the same shapes (benchmarks, planner).
`eval_codec` wraps them in `Labelled` (+ `label`) for evaluation; fine-tuning tasks build their own (tasks/).
"""
from __future__ import annotations

import dataclasses

from .audio import AudioCodec
from .image import MAX_IMAGE_PIXELS, ImageCodec, eval_transform, finetune_transform, open_image
from .labels import Labelled, check_first_sample, check_labels, class_names, sample_counts
from .s3 import register
from .shards import DataError, Shards, check_shards, check_url, find_shards, shard_list
from .text import SentenceCodec, TextCodec
from .wds import Loader


def build_codec(cfg) -> ImageCodec | AudioCodec | TextCodec:
    """The codec for `cfg.model.modality` (cfg: the root Config)."""
    m = cfg.model
    if m.modality == "image":
        return ImageCodec(m.image.img_size, cfg.data.crop_scale, m.image.in_chans,
                          max_pixels=cfg.data.max_image_pixels)
    if m.modality == "audio":
        return AudioCodec(cfg.data)
    if m.modality == "text":
        return TextCodec(cfg.data.tokens_per_sample, m.text.vocab_size)
    raise DataError(f"unknown modality {m.modality!r}")


def eval_codec(cfg, num_classes: int = 0, sentences: bool = False) -> Labelled | SentenceCodec:
    """Labelled samples without randomness, for evaluation: images resized and centre-cropped, audio
    padded to the longest utterance of a batch (with its padding mask) instead of cropped, text as is:
    blocks of `d2v-shard text`, or (`sentences`) the variable-length samples of `d2v-shard glue`."""
    m = cfg.model
    if m.modality == "text" and sentences:
        return SentenceCodec(m.text.max_positions, m.text.vocab_size, num_classes, pad_idx=m.text.pad_idx)
    if m.modality == "image":
        codec = ImageCodec(m.image.img_size, cfg.data.crop_scale, m.image.in_chans,
                           transform=eval_transform(m.image.img_size, cfg.finetune.crop_pct),
                           max_pixels=cfg.data.max_image_pixels)
    elif m.modality == "audio":
        codec = AudioCodec(dataclasses.replace(cfg.data, pad_audio=True))
    else:
        codec = build_codec(cfg)
    return Labelled(codec, num_classes)


def synthetic_batch(cfg) -> dict:
    """A batch of `data.batch_size` samples shaped as training sees them (random values)."""
    return build_codec(cfg).synthetic(cfg.data.batch_size)


def build_loader(cfg, rank: int, world: int, state: dict | None = None, urls: list[str] | None = None,
                 prepare=None, codec=None) -> Loader:
    """cfg: the root Config (data settings + the modality's input sizes); `prepare(batch, index)` runs
    on every collated batch in the workers (training: masking.AheadMasks); `codec` replaces the
    modality's pretraining codec (fine-tuning)."""
    register(cfg.data.allow_pipe)   # s3:// through boto3, no shell schemes; inherited by the forked workers
    urls = urls if urls is not None else shard_list(cfg.data.path, cfg.data.allow_pipe)
    urls = [check_url(u, cfg.data.allow_pipe, "the shard list") for u in urls]
    codec = codec or build_codec(cfg)
    return Loader(urls, cfg.data, rank=rank, world=world, seed=cfg.run.seed, batch_size=cfg.data.batch_size,
                  decode=codec.decode, collate=codec.collate, state=state, prepare=prepare)


__all__ = ["MAX_IMAGE_PIXELS", "AudioCodec", "DataError", "ImageCodec", "Labelled", "Loader", "SentenceCodec",
           "Shards", "TextCodec", "build_codec", "build_loader", "check_first_sample", "check_labels", "check_shards",
           "class_names", "eval_codec", "find_shards", "open_image", "sample_counts", "shard_list", "synthetic_batch"]
