"""Pooled features of labelled shards from a frozen encoder (dinov2 `eval/utils.py: extract_features`):
rank r of R decodes samples r, r + R, ... in shard order without augmentation, every rank runs the same
number of forwards (padding batches, label -1: ZeRO-3's gathers need it), and the features come back
on every rank in sample order, so results do not depend on the world size.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import webdataset as wds
from tqdm import tqdm

from ..data import DataError, check_labels, check_shards, class_names, find_shards, register, sample_counts
from ..data.wds import ErrorCounter, init_worker
from ..dist import Dist
from ..models import pool_tokens


@dataclass
class EvalShards:
    urls: list[str]
    counts: list[int]            # samples per shard
    num_classes: int             # 0: unknown (from the labels seen)
    source: str                  # the option they came from, for messages
    sentences: bool = False      # text: variable-length samples of `d2v-shard glue`, not fixed blocks
    class_names: list[str] | None = None   # by class index, from classes.json beside the shards (None: unknown)

    @property
    def samples(self) -> int:
        return sum(self.counts)


def check_same_classes(train: EvalShards, val: EvalShards) -> None:
    """Labels are compared by number: refuse validation shards whose class numbers name other classes
    than the training shards' (both classes.json known; a val holding a subset in the same numbering is fine)."""
    a, b = train.class_names, val.class_names
    if not a or not b:
        return
    index = {c: i for i, c in enumerate(a)}
    wrong = [(i, c) for i, c in enumerate(b) if index.get(c) != i]
    if wrong:
        i, c = wrong[0]
        there = f"{a[i]!r}" if i < len(a) else "no class"
        raise DataError(f"{train.source} and {val.source} number their classes differently: class {i} is {there} in "
                        f"the first and {c!r} in the second ({len(wrong)} of {len(b)} differ; classes.json beside each "
                        "lists them); labels are matched by number, so shard both from folders (or --labels) with the "
                        "same class names")


def eval_shards(path: str, modality: str, source: str, allow_pipe: bool = False) -> EvalShards:
    """Checked labelled shards: they exist, are tar archives of `modality` with a `cls` per sample."""
    shards = find_shards(path, allow_pipe)
    num_classes = check_labels(shards, f"{source} {path}", modality)
    check_shards(shards, modality, f"{source} {path}", every_local=False)
    counts = sample_counts(shards)
    if sum(counts) < 2:
        raise DataError(f"{source} {path} holds {sum(counts)} samples; evaluation needs at least 2")
    sentences = modality == "text" and isinstance(shards.index.get("glue"), dict)
    return EvalShards(shards.urls, counts, num_classes, source, sentences, class_names(shards))


class EvalStream(torch.utils.data.IterableDataset):
    """This rank's samples in batches {"source", "label", "index"} (+ "padding_mask"); exactly
    `self.batches` of them, the last ones padding (label -1) where the rank ran out."""

    def __init__(self, shards: EvalShards, codec, batch_size: int, rank: int, world: int):
        super().__init__()
        self.shards, self.codec, self.batch_size, self.rank, self.world = shards, codec, batch_size, rank, world
        self.batches = math.ceil(math.ceil(shards.samples / world) / batch_size)

    def __iter__(self):
        """A problem that stops the stream arrives as one {"error": message} item (said by `extract`)."""
        try:
            yield from self._batches()
        except (DataError, OSError, ValueError, RuntimeError) as e:
            yield {"error": f"{self.shards.source}: {type(e).__name__}: {e}"}

    def _batches(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        B, buf, done = self.batch_size, [], 0
        skipped = ErrorCounter(f"{self.shards.source} sample")
        samples = wds.tarfile_to_samples()(iter({"url": u} for u in self.shards.urls))
        for i, sample in enumerate(samples):
            if i % self.world != self.rank or (i // self.world // B) % W != w:
                continue                                     # another rank's or worker's sample: not decoded
            try:
                buf.append((self.codec.decode(sample), i))
            except Exception as e:  # noqa: BLE001 - an undecodable sample is left out, as in training
                if type(e).__name__ != "TooShort":            # left out by the recipe: not warned about
                    skipped(ValueError(f"{sample.get('__url__')}:{sample.get('__key__')}: {e}"))
                continue
            if len(buf) == B:
                yield self._batch(buf)
                buf, done = [], done + 1
        if buf:
            yield self._batch(buf)
            done += 1
        mine = len(range(w, self.batches, W))                   # batches this worker owes
        for _ in range(mine - done):
            pad = self.codec.synthetic(1)
            yield {**pad, "label": torch.full((1,), -1), "index": torch.full((1,), -1)}

    def _batch(self, items: list) -> dict:
        batch = self.codec.collate([x for x, _ in items])
        batch["index"] = torch.tensor([i for _, i in items])
        return batch


def eval_loader(stream: EvalStream, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over the stream; its own generator, so creating it draws nothing from the global RNG."""
    register()
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, worker_init_fn=init_worker if num_workers else None,
        generator=torch.Generator(),
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None)


def pooled(encoder, source: torch.Tensor, padding_mask, pools: tuple[str, ...], local=None) -> dict:
    """{how: (B, D)} pooled tokens of the full input (`local`: see Encoder.extract_features)."""
    x, pad = encoder.extract_features(source, padding_mask, local)              # (B, E+T, D)
    return pool_all(x, pad, encoder.num_extra_tokens, pools)


def pool_all(x: torch.Tensor, pad, num_extra_tokens: int, pools: tuple[str, ...]) -> dict:
    """{how: (B, D)} of tokens x (B, E+T, D) with their padding (B, T) or None."""
    return {how: pool_tokens(x, how, num_extra_tokens, pad) for how in pools}


@torch.no_grad()
def extract(forward, stream: EvalStream, dist: Dist, dtype: torch.dtype, num_workers: int = 1,
            desc: str = "") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """forward(source, padding_mask) -> {name: (B, D)} over every sample of the stream's shards, on every
    rank: ({name: (N, D) fp32 on CPU}, labels (N,)), in the shards' sample order."""
    feats, labels, index = {}, [], []
    bar = tqdm(total=stream.batches, desc=desc, unit="batch", leave=False) \
        if desc and dist.is_main and sys.stderr.isatty() else None
    t0 = time.perf_counter()
    for batch in eval_loader(stream, num_workers):
        if "error" in batch:
            raise DataError(batch["error"])
        x = batch["source"].to(dist.device)
        x = x.to(dtype) if x.is_floating_point() else x
        pad = batch.get("padding_mask")
        out = forward(x, pad.to(dist.device) if pad is not None else None)
        for name, f in out.items():
            feats.setdefault(name, []).append(f.float().cpu())
        labels.append(batch["label"])
        index.append(batch["index"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    elif desc and dist.is_main:
        print(f"{desc}: {stream.shards.samples} samples in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = {name: torch.cat(f) for name, f in feats.items()}
    labels, index = torch.cat(labels), torch.cat(index)
    rows, labels, index = _gather(rows, labels, index, dist, stream.batches * stream.batch_size)
    keep = index >= 0
    order = index[keep].argsort()
    return {n: f[keep][order] for n, f in rows.items()}, labels[keep][order]


def _gather(rows: dict, labels: torch.Tensor, index: torch.Tensor, dist: Dist, size: int):
    """Every rank's rows, padded to `size` each (index -1), concatenated on every rank."""
    if dist.world == 1:
        return rows, labels, index

    def padded(t: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((size, *t.shape[1:]), fill, dtype=t.dtype)
        out[: t.shape[0]] = t
        return out.to(dist.device)

    def gathered(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.world)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts).cpu()

    rows = {n: gathered(padded(f, 0.0)) for n, f in sorted(rows.items())}
    return rows, gathered(padded(labels, -1)), gathered(padded(index, -1))
