"""Benchmarks of the data path and the EMA that measure side by side in one process and print
ratios (not timed tests); the training step's benchmark is bench_step.py.

  d2v bench data --data SHARDS [--s3 s3://...] [--workers 1,2,4]
      decode + augment samples/s of the same shards from local disk and from S3, and the ratio.
  deepspeed --num_accelerators 2 --no_local_rank --module d2v_scale.cli bench ema [--preset ...]
      per-rank time and bytes of the shard-local EMA vs a gathered full-model EMA, and the ratio.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from data_prep.s3_upload import Uploader

from .. import dist as dist_mod
from ..config import with_vocab
from ..d2v import Data2Vec
from ..data import build_loader, register, shard_list
from ..dist import print0
from ..dsconfig import zero_stage
from ..teacher.ema import local_source
from ..engine import build_engine
from ..presets import build_config
from ..teacher import ReplicatedTeacher
from .objectstore import SeaweedFS


def _loader_rate(cfg, urls: list[str], workers: int, batches: int) -> float:
    cfg.data.num_workers = workers
    it = iter(build_loader(cfg, 0, 1, urls=urls))
    for _ in range(max(2, workers)):                        # start-up: worker spawn, first shards
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * cfg.data.batch_size / (time.perf_counter() - t0)


def bench_data(data: str, s3: str | None = None, preset: str = "vit_base_patch16_debug", workers: str = "1,2",
               batches: int = 40, batch_size: int = 32, **overrides) -> dict:
    """Decode + augment samples/s from local disk and from S3, same shards, side by side.

    Without --s3 a local SeaweedFS is started and the shards are uploaded to it with d2v-shard's
    uploader (its throughput is reported too)."""
    cfg, _ = build_config(preset, None, **overrides)
    cfg.data.batch_size, cfg.data.shuffle_buffer = batch_size, 100
    cfg.data.sampling = "resample"                          # any worker count on any shard count
    cfg.data.epoch_samples = 10 ** 9
    local = shard_list(data)
    store, upload = None, None
    try:
        if s3 is None:
            store = SeaweedFS(tempfile.mkdtemp(prefix="d2v-bench-s3-"), buckets=("bench",)).start()
            os.environ.update(store.env())
            up = Uploader("s3://bench/shards/x-%06d.tar")
            t0 = time.perf_counter()
            remote = []
            for i, path in enumerate(local):
                url = f"s3://bench/shards/{Path(path).name}"
                tmp = Path(up.tmpdir) / Path(path).name
                shutil.copy(path, tmp)
                up.submit(str(tmp), url)
                remote.append(url)
            up.wait()
            upload = up.bytes / 1e6 / (time.perf_counter() - t0)
            up.close()
        else:
            remote = shard_list(s3)
        register()
        rows = []
        counts = workers if isinstance(workers, (list, tuple)) else str(workers).split(",")
        for w in [int(x) for x in counts]:
            rl = _loader_rate(cfg, local, w, batches)
            rs = _loader_rate(cfg, remote, w, batches)
            rows.append({"workers": w, "local": rl, "s3": rs, "ratio": rs / rl})
    finally:
        if store is not None:
            store.stop()
    print(f"\nbench data: {cfg.model.modality} decode + augment, batch {batch_size}, {len(local)} shards")
    print(f"  {'workers':>7} {'local/s':>10} {'s3/s':>10} {'s3/local':>9}")
    for r in rows:
        print(f"  {r['workers']:>7} {r['local']:>10.1f} {r['s3']:>10.1f} {r['ratio']:>9.2f}")
    if upload is not None:
        print(f"  d2v-shard upload to the local S3 endpoint: {upload:.1f} MB/s")
    return {"rows": rows, "upload_mb_per_s": upload}


class _PerTensorEma:
    """The shard-local EMA as d2v_scale did it before ema.py, for the side-by-side row: per tensor,
    the source moved to the host one tensor at a time, two foreach passes, a copy per compute slice.
    It blends into copies of the teacher's slices, leaving the teacher itself alone."""

    def __init__(self, teacher, rank: int):
        self.teacher, self.rank = teacher, rank
        self.fp32 = [a.clone() for a in teacher.fp32]
        self.low = [t.clone() for t in teacher.low] if teacher.low is not teacher.fp32 else None

    @torch.no_grad()
    def update(self, student_encoder, decay: float) -> None:
        student = dict(student_encoder.named_parameters())
        src, dst = [], []
        for n, a in zip(self.teacher.names, self.fp32):
            s = local_source(student[n], self.rank, a.numel())
            if s.numel():
                src.append(s.to(a.device, torch.float32))
                dst.append(a[: s.numel()])
        torch._foreach_mul_(dst, decay)
        torch._foreach_add_(dst, src, alpha=1.0 - decay)
        for low, a in zip(self.low or [], self.fp32):
            low.copy_(a)

    def wait(self) -> None:
        pass


def bench_ema(preset: str = "vit_base_patch16", reps: int = 5, ds_config: str = "ds_configs/zero3.json",
              gathered: bool = True, **overrides) -> dict:
    """Per-rank time and bytes of the shard-local EMA (ShardedTeacher) vs a gathered full-model EMA
    (ReplicatedTeacher reading the ZeRO-3 student through all-gathers), same student, same process
    (`--gathered false`: the shard-local one alone, e.g. a ViT-H teacher on a small host).
    Launch with the deepspeed launcher for N ranks:
      deepspeed --num_accelerators 2 --no_local_rank --module d2v_scale.cli bench ema --preset vit_base_patch16
    """
    gathered = str(gathered).lower() not in ("false", "0", "no")        # fire passes `false` as a string
    cfg, ds_over = build_config(preset, None, ds_config=ds_config, **overrides)
    cfg.teacher.placement, cfg.data.global_batch = "host", 0
    with_vocab(cfg)
    dist = dist_mod.init()
    built = build_engine(cfg, dist, ds_overrides={"zero_optimization.stage3_param_persistence_threshold": 0,
                                                  **ds_over})           # every param partitioned
    engine, sharded, ds = built.engine, built.teacher, built.ds
    teachers = [("shard-local", sharded), ("per tensor", _PerTensorEma(sharded, dist.rank))]
    if gathered:
        torch.manual_seed(cfg.run.seed)                                 # the student's initial weights again
        teachers.append(("gathered", ReplicatedTeacher(Data2Vec(cfg.model, cfg.mask.mask_noise_std).encoder,
                                                       cfg.model, dtype=built.dtype, device=dist.device)))
    results = {}
    for name, teacher in teachers:
        teacher.update(engine.module.encoder, 0.999)                     # warm-up (plans the runs)
        teacher.wait()
        with dist_mod.count_collectives() as c:
            t0 = time.perf_counter()
            for _ in range(reps):
                teacher.update(engine.module.encoder, 0.999)
                teacher.wait()
            dt = (time.perf_counter() - t0) / reps
        results[name] = {"s_per_update": dt, "collectives": c.calls / reps, "bytes": c.bytes / reps}
    n_params = sum(math.prod(s) for s in sharded.shapes.values())
    local = sum(a.numel() for a in sharded.fp32)
    stage = zero_stage(ds)
    print0(f"\nbench ema: {cfg.preset} teacher ({n_params / 1e6:.1f}M params, {local / 1e6:.1f}M on this rank in "
           f"{len(sharded.runs)} contiguous runs), {dist.world} ranks, ZeRO-{stage} student, "
           f"{torch.get_num_threads()} threads")
    print0(f"  {'':>12} {'ms/update':>10} {'collectives':>12} {'MB sent':>9} {'GB/s blended':>13}")
    for name, r in results.items():
        print0(f"  {name:>12} {r['s_per_update'] * 1e3:>10.1f} {r['collectives']:>12.0f} {r['bytes'] / 1e6:>9.1f}"
               f" {local * 4 / r['s_per_update'] / 1e9 if name != 'gathered' else float('nan'):>13.2f}")
    ratio = results["shard-local"]["s_per_update"] / results["gathered"]["s_per_update"] if gathered else None
    if ratio is not None:
        print0(f"  time shard-local / gathered = {ratio:.3f}  (1/N = {1 / dist.world:.3f})")
    print0(f"  time shard-local runs / per tensor = "
           f"{results['shard-local']['s_per_update'] / results['per tensor']['s_per_update']:.3f}")
    return {"results": results, "ratio": ratio, "world": dist.world}
