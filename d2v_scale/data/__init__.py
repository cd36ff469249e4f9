"""build_loader: shards -> dict batches (`source`, optional `padding_mask`) for one rank."""
from __future__ import annotations

from .shards import DataError, Shards, check_shards, find_shards, shard_list
from .wds import Loader


def sample_codec(cfg):
    """(decode(sample) -> item, collate(items) -> batch dict) for `cfg.model.modality`."""
    m = cfg.model.modality
    if m == "image":
        from .image import ImageTransform, collate
        return ImageTransform(cfg.model.image.img_size, cfg.data.crop_scale), collate
    if m == "audio":
        from .audio import AudioDecoder, Collater
        return AudioDecoder(cfg.data), Collater(cfg.data, cfg.model.audio)
    if m == "text":
        from .text import TextDecoder, collate
        return TextDecoder(cfg.data.tokens_per_sample), collate
    raise DataError(f"unknown modality {m!r}")


def build_loader(cfg, rank: int, world: int, state: dict | None = None, urls: list[str] | None = None) -> Loader:
    """cfg: the root Config (data settings + the modality's input sizes)."""
    from .s3 import register
    from .shards import check_url
    register(cfg.data.allow_pipe)   # s3:// through boto3, no shell schemes; inherited by the forked workers
    urls = urls if urls is not None else shard_list(cfg.data.path, cfg.data.allow_pipe)
    urls = [check_url(u, cfg.data.allow_pipe, "the shard list") for u in urls]
    decode, collate = sample_codec(cfg)
    return Loader(urls, cfg.data, rank=rank, world=world, seed=cfg.run.seed, batch_size=cfg.data.batch_size,
                  decode=decode, collate=collate, state=state)


__all__ = ["DataError", "Loader", "Shards", "build_loader", "check_shards", "find_shards", "shard_list",
           "sample_codec"]
