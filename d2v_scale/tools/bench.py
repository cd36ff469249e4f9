"""Benchmarks that measure side by side in one process and print ratios (not timed tests).

  d2v bench step --preset vit_base_patch16_debug [--steps 10] [--key=value ...]
      forward + backward + optimizer step + EMA through the DeepSpeed engine on synthetic batches;
      samples/s, achieved TFLOP/s and MFU against the GEMM peak measured in the same run.
  d2v bench data --data SHARDS [--s3 s3://...] [--workers 1,2,4]
      decode + augment samples/s of the same shards from local disk and from S3, and the ratio.
  deepspeed --num_accelerators 2 --no_local_rank --module d2v_scale.cli bench ema [--preset ...]
      per-rank time and bytes of the shard-local EMA vs a gathered full-model EMA, and the ratio.
"""
from __future__ import annotations

import copy
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
from ..d2v import Data2Vec, var_stats
from ..data import build_loader, register, shard_list, synthetic_batch
from ..dist import print0
from ..dsconfig import zero_stage
from ..engine import build_engine
from ..flops import step_flops_per_sample
from ..metrics import measure_peak_flops
from ..presets import build_config
from ..teacher import ReplicatedTeacher
from ..train import train_step
from .objectstore import SeaweedFS


def _time_steps(engine, teacher, cfg, dist, dtype, steps: int, warmup: int) -> float:
    batch = synthetic_batch(cfg)
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    gas = engine.gradient_accumulation_steps()
    for i in range(warmup * gas):
        train_step(engine, teacher, batch, cfg, i // gas, i % gas, dist, dtype)
    sync()
    t0 = time.perf_counter()
    for i in range(steps * gas):
        train_step(engine, teacher, batch, cfg, warmup + i // gas, i % gas, dist, dtype)
    sync()
    return (time.perf_counter() - t0) / steps


class Data2Vec1Style(torch.nn.Module):
    """The data2vec (1) compute pattern on the same encoder, for `--compare d2v1`: one mask per sample,
    the student encodes the whole sequence with masked tokens blanked, a linear head predicts the
    targets at masked positions (no clones, no token dropping, no conv decoder)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = torch.nn.Linear(model.cfg.embed_dim, model.cfg.embed_dim)

    @property
    def encoder(self):
        return self.model.encoder

    def forward(self, source, mask, teacher, padding_mask=None, layer_keep=None):
        enc = self.model.encoder
        feats, pad = enc.local_features(source, padding_mask)                       # (B, T, D)
        with torch.no_grad():
            y = teacher(source, feats.detach(), pad)                                  # (B, T, D)
        x = feats * (~mask)[..., None].to(feats.dtype)                                # masked tokens blanked
        x, _ = enc(x, None, 1, pad, layer_keep=layer_keep)                            # (B, E+T, D): all tokens
        pred = self.head(x[:, enc.num_extra_tokens:])                                 # (B, T, D)
        rows, pos = mask.nonzero(as_tuple=True)
        pred_m, y_m = pred[rows, pos].float(), y[rows, pos]
        loss = ((pred_m - y_m) ** 2).sum() * self.model.loss_scale
        return {"loss": loss, "sample_size": rows.numel(), "pred_stats": var_stats(pred_m),
                "target_stats": var_stats(y_m)}


def bench_step(preset: str = "vit_base_patch16_debug", steps: int = 10, warmup: int = 2,
               ds_config: str = "ds_configs/zero0.json", compare: str | None = None, **overrides) -> dict:
    """`--compare d2v1` also times the data2vec-1 pattern (one mask, whole sequence) on the same model
    and batch in the same process and prints the ratios."""
    cfg, ds_over = build_config(preset, None, ds_config=ds_config, **overrides)
    cfg.optim.warmup_steps = 0                      # time real updates, not lr = 0 ones
    with_vocab(cfg)                                 # synthetic ids; the real size comes from the shards
    dist = dist_mod.init()
    built = build_engine(cfg, dist, ds_overrides=ds_over)
    engine, teacher, dtype = built.engine, built.teacher, built.dtype
    enc = engine.module.encoder
    src = synthetic_batch(cfg)["source"]
    flops = step_flops_per_sample(cfg, math.prod(enc.token_shape(src)), enc.num_extra_tokens, src.shape[-1])
    peak = measure_peak_flops(dist.device, dtype if dtype != torch.float32 else torch.float32)
    dt = _time_steps(engine, teacher, cfg, dist, dtype, steps, warmup)
    samples = cfg.data.batch_size * engine.gradient_accumulation_steps() * dist.world
    achieved = flops["total"] * samples / dt / dist.world
    result = {"preset": cfg.preset, "batch": samples, "clone_batch": cfg.mask.clone_batch,
              "step_s": dt, "samples_per_s": samples / dt, "model_tflop_per_sample": flops["total"] / 1e12,
              "achieved_tflops_per_rank": achieved / 1e12, "peak_tflops_per_rank": peak / 1e12,
              "mfu": achieved / peak, "teacher_share_of_flops": flops["teacher"] / flops["total"],
              "dtype": str(dtype).replace("torch.", ""), "device": str(dist.device)}
    print0(f"\nbench step: {cfg.preset} | batch {samples} x {cfg.mask.clone_batch} clones | {result['dtype']} on "
           f"{result['device']}, {torch.get_num_threads()} threads")
    print0(f"  step time            {dt * 1e3:10.1f} ms")
    print0(f"  samples/s            {samples / dt:10.2f}")
    print0(f"  model GFLOP/sample   {flops['total'] / 1e9:10.3f}  (teacher {result['teacher_share_of_flops']:.1%})")
    print0(f"  achieved TFLOP/s     {achieved / 1e12:10.4f}")
    print0(f"  GEMM peak TFLOP/s    {peak / 1e12:10.4f}  (measured now, same process)")
    print0(f"  MFU = achieved/peak  {achieved / peak:10.1%}")
    if compare == "d2v1":
        cfg1 = copy.deepcopy(cfg)
        cfg1.mask.clone_batch = 1
        d2v1 = build_engine(cfg1, dist, ds_overrides=ds_over, wrap=Data2Vec1Style)
        dt1 = _time_steps(d2v1.engine, d2v1.teacher, cfg1, dist, dtype, steps, warmup)
        M = cfg.mask.clone_batch
        result.update(d2v1_step_s=dt1, step_time_ratio_d2v2_over_d2v1=dt / dt1,
                      masked_views_per_s_ratio=(samples * M / dt) / (samples / dt1))
        print0(f"\n  data2vec-1 pattern (1 mask/sample, student sees all {math.prod(enc.token_shape(src))} tokens, "
               f"linear head), same model and batch:")
        print0(f"  d2v1 step time       {dt1 * 1e3:10.1f} ms")
        print0(f"  step time d2v2/d2v1  {dt / dt1:10.2f}   (d2v2 trains {M} masked views per sample)")
        print0(f"  masked views/s ratio {result['masked_views_per_s_ratio']:10.2f}   (d2v2 / d2v1)")
    return result


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


def bench_ema(preset: str = "vit_base_patch16", reps: int = 5, ds_config: str = "ds_configs/zero3.json",
              **overrides) -> dict:
    """Per-rank time and bytes of the shard-local EMA (ShardedTeacher) vs a gathered full-model EMA
    (ReplicatedTeacher reading the ZeRO-3 student through all-gathers), same student, same process.
    Launch with the deepspeed launcher for N ranks:
      deepspeed --num_accelerators 2 --no_local_rank --module d2v_scale.cli bench ema --preset vit_base_patch16
    """
    cfg, ds_over = build_config(preset, None, ds_config=ds_config, **overrides)
    cfg.teacher.placement, cfg.data.global_batch = "sharded", 0
    with_vocab(cfg)
    dist = dist_mod.init()
    built = build_engine(cfg, dist, ds_overrides={"zero_optimization.stage3_param_persistence_threshold": 0,
                                                  **ds_over})           # every param partitioned
    engine, sharded, ds = built.engine, built.teacher, built.ds
    torch.manual_seed(cfg.run.seed)                                     # the student's initial weights again
    replicated = ReplicatedTeacher(Data2Vec(cfg.model, cfg.mask.mask_noise_std).encoder, cfg.model,
                                   dtype=built.dtype, device=dist.device)
    results = {}
    for name, teacher in (("shard-local", sharded), ("gathered", replicated)):
        teacher.update(engine.module.encoder, 0.999)                     # warm-up
        with dist_mod.count_collectives() as c:
            t0 = time.perf_counter()
            for _ in range(reps):
                teacher.update(engine.module.encoder, 0.999)
            dt = (time.perf_counter() - t0) / reps
        results[name] = {"s_per_update": dt, "collectives": c.calls / reps, "bytes": c.bytes / reps}
    n_params = sum(math.prod(s) for s in sharded.shapes.values())
    ratio = results["shard-local"]["s_per_update"] / results["gathered"]["s_per_update"]
    stage = zero_stage(ds)
    print0(f"\nbench ema: {cfg.preset} teacher ({n_params / 1e6:.1f}M params), {dist.world} ranks, ZeRO-{stage} student")
    print0(f"  {'':>12} {'ms/update':>10} {'collectives':>12} {'MB sent':>9}")
    for name, r in results.items():
        print0(f"  {name:>12} {r['s_per_update'] * 1e3:>10.1f} {r['collectives']:>12.0f} {r['bytes'] / 1e6:>9.1f}")
    print0(f"  time shard-local / gathered = {ratio:.3f}  (1/N = {1 / dist.world:.3f})")
    return {"results": results, "ratio": ratio, "world": dist.world}
