"""`d2v probe`: what a frozen encoder learned, on labelled shards: mean-pooled (and, for images, CLS)
features extracted on every rank (features.py), kNN (k 20, cosine, weighted votes: dinov2) and a linear
probe (MAE's), top-1/top-5 on `--val`. Any weights `load_encoder` reads; checks run before ranks wait.
"""
from __future__ import annotations

import json
import os

import torch

from .. import dist as dist_mod
from ..config import ConfigError
from ..data import DataError, eval_codec
from ..dist import print0
from ..pretrained import PretrainedEncoder, random_weights, read_encoder
from .features import EvalStream, check_same_classes, eval_shards, extract, pooled
from .knn import accuracy, knn_scores
from .linear import linear_probe

HOW = ("knn", "linear", "both")


def probe(init: str, train: str, val: str, how: str = "both", teacher: bool = False, tag: str | None = None,
          k: int = 20, temperature: float = 0.07, batch_size: int = 64, num_workers: int = 2, epochs: int = 90,
          seed: int = 0, random_init: bool = False) -> dict:
    """Returns {pool: {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}} (the same on every rank).
    `random_init`: probe the same encoder as pretraining initialised it, instead of `init`'s weights."""
    if how not in HOW:
        raise ConfigError(f"--how {how!r}: one of {', '.join(HOW)}")
    if not train or not val:
        raise ConfigError("d2v probe needs --train SHARDS (the kNN bank / linear training set) and --val SHARDS, "
                          "both labelled")
    weights = random_weights(init) if random_init else read_encoder(init, teacher, tag)
    modality = weights.cfg.model.modality
    bank = eval_shards(train, modality, "--train")
    queries = eval_shards(val, modality, "--val")
    check_same_classes(bank, queries)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = dist_mod.init() if world > 1 else dist_mod.single()
    encoder = PretrainedEncoder(weights).to(dist.device).eval()
    pools = ("mean", "cls") if encoder.num_extra_tokens else ("mean",)
    if bank.sentences != queries.sentences:
        raise DataError(f"--train {train} and --val {val}: one holds sentences of `d2v-shard glue`, the other text "
                        "blocks of `d2v-shard text`; probe with shards of one kind")
    codec = eval_codec(weights.cfg, sentences=bank.sentences)

    def forward(x, pad):
        return pooled(encoder.encoder, x, pad, pools)

    print0(f"d2v probe: {weights.source} ({modality}, {'teacher' if teacher else 'student'}) | "
           f"{bank.samples} train / {queries.samples} val samples | world {dist.world}")
    torch.manual_seed(seed)
    f_tr, y_tr = extract(forward, EvalStream(bank, codec, batch_size, dist.rank, dist.world), dist,
                         torch.float32, num_workers, "features --train")
    f_va, y_va = extract(forward, EvalStream(queries, codec, batch_size, dist.rank, dist.world), dist,
                         torch.float32, num_workers, "features --val")
    num_classes = max(bank.num_classes, queries.num_classes, int(y_tr.max()) + 1, int(y_va.max()) + 1)
    if len(set(y_tr.tolist())) < 2:
        raise DataError(f"--train {train}: fewer than 2 classes; a probe needs labelled shards of several classes")
    results = {}
    for pool in pools:
        row = {}
        if how in ("knn", "both"):
            scores = knn_scores(f_tr[pool], y_tr, f_va[pool], num_classes, k, temperature)
            row.update({f"knn_{n}": v for n, v in accuracy(scores, y_va).items()})
        if how in ("linear", "both"):
            scores = linear_probe(f_tr[pool].to(dist.device), y_tr, f_va[pool].to(dist.device), num_classes,
                                  epochs=epochs, seed=seed)
            row.update({f"linear_{n}": v for n, v in accuracy(scores, y_va).items()})
        results[pool] = row
    if dist.is_main:
        print(f"{'pool':>6} " + " ".join(f"{c:>12}" for c in results[pools[0]]))
        for pool, row in results.items():
            print(f"{pool:>6} " + " ".join(f"{v:>12.2f}" for v in row.values()))
        print(json.dumps({"init": str(init), "classes": num_classes, "train": bank.samples, "val": queries.samples,
                          "results": results}))
    return results
