"""`d2v-shard verify INDEX`: re-read every shard of an index and report problems per shard.

Checks that each shard exists, has the recorded size and sha256, holds the recorded number of
samples, and that every sample decodes (image: PIL; audio: soundfile; text: a 1-D int32 block).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import soundfile as sf

from d2v_scale.data.format import AUDIO_EXT, TEXT_EXT, image_ext
from d2v_scale.data.image import MAX_IMAGE_PIXELS, open_image
from d2v_scale.data.s3 import S3Error, read_bytes


def _decode(sample: dict, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    if image_ext(sample):
        with open_image(sample[image_ext(sample)], max_pixels) as im:
            im.load()
    elif AUDIO_EXT in sample:
        wav, sr = sf.read(io.BytesIO(sample[AUDIO_EXT]), dtype="float32")
        if sr != 16000 or wav.ndim != 1 or len(wav) == 0:
            raise ValueError(f"audio is {sr} Hz, shape {wav.shape}; expected mono 16 kHz")
    elif TEXT_EXT in sample:
        ids = np.load(io.BytesIO(sample[TEXT_EXT]))
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"token block has shape {ids.shape}, dtype {ids.dtype}")
    else:
        raise ValueError(f"no known payload ({', '.join(k for k in sample if not k.startswith('__'))})")


def _samples(data: bytes):
    current, key = {}, None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
        for member in tf:
            if not member.isreg():
                continue
            base, _, ext = member.name.partition(".")
            if key is not None and base != key:
                yield key, current
                current = {}
            key = base
            current[ext] = tf.extractfile(member).read()
    if key is not None:
        yield key, current


def verify_shard(url: str, record: dict, decode: bool = True,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[dict, list[str]]:
    problems = []
    try:
        data = read_bytes(url)
    except (OSError, S3Error) as e:
        return {"url": url, "samples": 0}, [f"cannot read: {e}"]
    if "bytes" in record and len(data) != record["bytes"]:
        problems.append(f"size {len(data)} != recorded {record['bytes']}")
    if "sha256" in record and hashlib.sha256(data).hexdigest() != record["sha256"]:
        problems.append("sha256 differs from the index")
    n, bad = 0, []
    try:
        for key, sample in _samples(data):
            n += 1
            if decode:
                try:
                    _decode(sample, max_pixels)
                except Exception as e:  # noqa: BLE001
                    bad.append(f"{key}: {e}")
    except tarfile.TarError as e:
        problems.append(f"tar error after {n} samples: {e}")
    if "samples" in record and n != record["samples"]:
        problems.append(f"{n} samples != recorded {record['samples']}")
    if bad:
        problems.append(f"{len(bad)} undecodable samples (first: {bad[0]})")
    return {"url": url, "samples": n}, problems


def verify(index_url: str, decode: bool = True) -> dict:
    index = json.loads(read_bytes(index_url))
    base = index_url.rsplit("/", 1)[0] if "/" in index_url else "."
    report = {"shards": len(index["shards"]), "samples": 0, "problems": {}}
    for rec in index["shards"]:
        url = rec["url"] if "://" in rec["url"] or rec["url"].startswith("/") else f"{base}/{rec['url']}"
        info, problems = verify_shard(url, rec, decode, int(index.get("max_pixels") or MAX_IMAGE_PIXELS))
        report["samples"] += info["samples"]
        if problems:
            report["problems"][url] = problems
    if report["samples"] != index.get("samples", report["samples"]):
        report["problems"]["index"] = [f"{report['samples']} samples read != {index['samples']} in the index"]
    return report
