"""build_loader: shards -> dict batches (`source`, optional `padding_mask`) for one rank.

One codec per modality (`ImageCodec`, `AudioCodec`, `TextCodec`): `decode` a sample in the loader's
workers, `collate` a batch, and make a `synthetic` batch of the same shapes (benchmarks, planner).
"""
from __future__ import annotations

from .audio import AudioCodec
from .image import ImageCodec
from .s3 import register
from .shards import DataError, Shards, check_shards, check_url, find_shards, shard_list
from .text import TextCodec
from .wds import Loader


def build_codec(cfg) -> ImageCodec | AudioCodec | TextCodec:
    """The codec for `cfg.model.modality` (cfg: the root Config)."""
    m = cfg.model
    if m.modality == "image":
        return ImageCodec(m.image.img_size, cfg.data.crop_scale, m.image.in_chans)
    if m.modality == "audio":
        return AudioCodec(cfg.data)
    if m.modality == "text":
        return TextCodec(cfg.data.tokens_per_sample, m.text.vocab_size)
    raise DataError(f"unknown modality {m.modality!r}")


def synthetic_batch(cfg) -> dict:
    """A batch of `data.batch_size` samples shaped as training sees them (random values)."""
    return build_codec(cfg).synthetic(cfg.data.batch_size)


def build_loader(cfg, rank: int, world: int, state: dict | None = None, urls: list[str] | None = None,
                 prepare=None) -> Loader:
    """cfg: the root Config (data settings + the modality's input sizes); `prepare(batch, index)` runs
    on every collated batch in the workers (training: masking.AheadMasks)."""
    register(cfg.data.allow_pipe)   # s3:// through boto3, no shell schemes; inherited by the forked workers
    urls = urls if urls is not None else shard_list(cfg.data.path, cfg.data.allow_pipe)
    urls = [check_url(u, cfg.data.allow_pipe, "the shard list") for u in urls]
    codec = build_codec(cfg)
    return Loader(urls, cfg.data, rank=rank, world=world, seed=cfg.run.seed, batch_size=cfg.data.batch_size,
                  decode=codec.decode, collate=codec.collate, state=state, prepare=prepare)


__all__ = ["AudioCodec", "DataError", "ImageCodec", "Loader", "Shards", "TextCodec", "build_codec",
           "build_loader", "check_shards", "find_shards", "shard_list", "synthetic_batch"]
