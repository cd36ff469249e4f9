"""Class labels in shards: the `cls` key d2v-shard writes (image class folders; audio and text with
--labels), the class map beside the shards (classes.json), per-shard sample counts, and `Labelled`,
a codec wrapper that hands each sample's label on with it (`batch["label"]`, (B,) int64).
The label layout is torchvision's ImageFolder / fairseq's `add_class_target_dataset.py`: sorted class
names, index = position.
"""
from __future__ import annotations

import json
import tarfile
from urllib.parse import urlparse

import torch
import webdataset as wds

from .format import AUDIO_EXT, CLASS_EXT, TEXT_EXT, image_ext
from .s3 import S3Error, read_bytes, register
from .shards import DataError, Shards, is_local, local_path

NO_LABELS_FIX = ("make labelled shards: `d2v-shard image DIR ...` on class subfolders (DIR/<class>/*.jpg), or "
                 "`d2v-shard audio|text ... --labels FILE.tsv|folders`")


def first_sample(url: str) -> dict | None:
    """The first sample of a shard (local, s3:// or http(s)://), read through webdataset."""
    register()
    samples = wds.tarfile_to_samples()(iter([{"url": url}]))
    return next(iter(samples), None)


def class_names(shards: Shards) -> list[str] | None:
    """The sorted class names of classes.json beside the shards (d2v-shard writes it), or None."""
    base = shards.urls[0].rsplit("/", 1)[0] if "/" in shards.urls[0] else "."
    try:
        mapping = json.loads(read_bytes(f"{base}/classes.json"))
    except (FileNotFoundError, S3Error, ValueError, OSError):
        return None
    return sorted(mapping, key=mapping.get) if isinstance(mapping, dict) else None


def sample_modality(sample: dict) -> str | None:
    """What a sample holds, from its keys: image, audio or text (None: none of them)."""
    if image_ext(sample):
        return "image"
    return "audio" if AUDIO_EXT in sample else "text" if TEXT_EXT in sample else None


def check_first_sample(shards: Shards, modality: str, source: str) -> None:
    """Raise DataError unless the first sample of the first shard holds `modality`'s payload (tars of
    `.txt` alone, or of another modality without an index saying so, would give no sample to train on)."""
    url = shards.urls[0]
    if urlparse(url).scheme == "pipe":
        return                                          # not run before training: it is a shell command
    try:
        sample = first_sample(url)
    except (OSError, S3Error, ValueError, tarfile.TarError) as e:
        raise DataError(f"{source}: cannot read a sample of {url} ({e})") from None
    if sample is None:
        raise DataError(f"{source}: {url} holds no sample; make shards with `d2v-shard`")
    held = sample_modality(sample)
    if held != modality:
        keys = ", ".join(f".{k}" for k in sample if not k.startswith("__")) or "nothing"
        what = f"{held} samples" if held else f"no image, audio or text payload, only {keys}"
        raise DataError(f"{source}: the first sample of {url} holds {what}, but the model is a {modality} encoder: "
                        f"give {modality} shards (d2v-shard {modality} ...) or a preset for what they hold")


def check_labels(shards: Shards, source: str, modality: str | None = None) -> int:
    """Raise DataError unless the shards carry class labels (and, given `modality`, hold that kind of
    sample); return the number of classes (0: unknown)."""
    made = shards.index.get("modality")
    if modality and made and made != modality:
        raise DataError(f"{source} holds {made} samples (its index says so) but the encoder is a {modality} encoder: "
                        f"evaluate it on {modality} shards, or an {made} encoder on these")
    if shards.index.get("classes") == 0:
        raise DataError(f"{source}: its index says the shards have no class labels; {NO_LABELS_FIX}")
    try:
        sample = first_sample(shards.urls[0])
    except (OSError, S3Error, ValueError, tarfile.TarError) as e:
        raise DataError(f"{source}: cannot read a sample of {shards.urls[0]} ({e})") from None
    held = sample_modality(sample or {})
    if modality and held and held != modality:
        raise DataError(f"{source} holds {held} samples but the encoder is a {modality} encoder: evaluate it on "
                        f"{modality} shards, or an {held} encoder on these")
    if sample is None or CLASS_EXT not in sample:
        raise DataError(f"{source}: the samples have no class label (.{CLASS_EXT}); {NO_LABELS_FIX}")
    names = class_names(shards)
    return len(names) if names else int(shards.index.get("classes", 0) or 0)


def sample_counts(shards: Shards) -> list[int]:
    """Samples per shard: from the d2v-shard index, or by reading the tar headers (local) or the shard."""
    by_name = {s["url"].rsplit("/", 1)[-1]: s.get("samples") for s in shards.index.get("shards", [])}
    return [int(by_name.get(url.rsplit("/", 1)[-1]) or _count(url)) for url in shards.urls]


def _count(url: str) -> int:
    if is_local(url):
        with tarfile.open(local_path(url)) as tf:
            return len({m.name.split(".", 1)[0] for m in tf if m.isreg()})
    register()
    return sum(1 for _ in wds.tarfile_to_samples()(iter([{"url": url}])))


class Labelled:
    """Wraps a codec: decode -> (sample tensor, class index); collate adds "label" (B,) int64.
    A label outside [0, num_classes) stops the stream with the fix (num_classes 0: not checked)."""

    def __init__(self, codec, num_classes: int = 0):
        self.codec, self.num_classes = codec, num_classes

    def decode(self, sample: dict):
        if CLASS_EXT not in sample:
            raise ValueError(f"sample {sample.get('__key__')} has no class label (.{CLASS_EXT})")
        return self.codec.decode(sample), int(sample[CLASS_EXT])

    def collate(self, items: list) -> dict:
        labels = torch.tensor([y for _, y in items], dtype=torch.int64)                # (B,)
        if self.num_classes and (int(labels.max()) >= self.num_classes or int(labels.min()) < 0):
            raise DataError(f"a sample has class {int(labels.max())} but the head has {self.num_classes} classes: "
                            "the shards hold more classes than --finetune.num_classes (or the weights' head); "
                            "set --finetune.num_classes to the shards' class count")
        return {**self.codec.collate([x for x, _ in items]), "label": labels}

    def synthetic(self, batch_size: int) -> dict:
        return {**self.codec.synthetic(batch_size), "label": torch.zeros(batch_size, dtype=torch.int64)}
