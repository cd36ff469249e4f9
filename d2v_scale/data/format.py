"""The one place that names sample keys and encodings inside the tar shards (writer and reader).

A shard is a WebDataset tar: files `<key>.<ext>` grouped by key. data_prep writes these and
d2v_scale.data reads them, both through the names below, so the two never drift.
"""
from __future__ import annotations

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")  # one of these per image sample (written: as found)
CLASS_EXT = "cls"             # optional integer class index (ImageNet layout), text
AUDIO_EXT = "flac"            # mono 16 kHz flac
TEXT_EXT = "ids.npy"          # one block of sentencepiece ids (uint16, or int32 for vocabularies > 65536)
SOURCE_EXT = "src.txt"        # optional provenance of the sample (file it came from)
TRANSCRIPT_EXT = "txt"        # optional transcript of an audio sample (utf-8, words single-spaced)
TARGET_EXT = "target"         # a regression target (GLUE STS-B), decimal text, instead of a class

SAMPLE_RATE = 16_000
INCOMPLETE = "d2v-shard.incomplete"   # beside the shards while d2v-shard writes them; removed after index.json


def image_ext(sample: dict) -> str | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None
