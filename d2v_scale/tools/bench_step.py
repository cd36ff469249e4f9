"""`d2v bench step`: the data2vec 2.0 training step through the DeepSpeed engine on synthetic batches.

  d2v bench step --preset vit_base_patch16 [--compare timm|d2v1] [--breakdown] [--steps 10] [--key=value ...]

The step (forward with the teacher's targets, backward, optimizer step, EMA; masks drawn ahead as the
loader's workers draw them, batches pinned on a GPU) is timed. Efficiency counts *model* FLOPs
(flops.py: the step's work without activation checkpointing's recompute, which the tests hold within
3% of torch's FlopCounterMode on a step without checkpointing) against the best of a few GEMM sizes;
the FLOPs executed (FlopCounterMode on one real step, recompute included) are printed beside.
`--compare timm` times a plain supervised timm ViT of the same width, depth and patch (or timm Blocks
on the same tokens for audio/text; no checkpointing, so its model FLOPs are its counted FLOPs) in the
same process and prints efficiency(d2v2) / efficiency(peer); `--compare d2v1` the real data2vec 1
model (d2v1/) of the same encoder size, masked views per second side by side.
The same run with the EMA switched off is timed beside (the EMA's exposed share of the step); peak
device memory and pinned host memory are printed. An efficiency above 100% is printed as a peak
under-measured, never as a number. `--breakdown` adds synchronised per-phase times and the top device
and host ops of torch.profiler (it cannot show the EMA's share: it synchronises around every phase).
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from .. import dist as dist_mod
from ..config import with_vocab
from ..data import synthetic_batch
from ..dist import print0
from ..dsconfig import matmul_dtype, zero_stage
from ..engine import build_engine
from ..flops import count_flops, step_flops_per_sample
from ..masking import AheadMasks
from ..metrics import PEAK_SIZES, efficiency_text, measure_peak_flops
from ..presets import build_config
from ..train import train_step
from .peers import PeerStep, peer_batch, timm_name, timm_peer


class D2VStep:
    """One optimizer step (all its micro-steps) of a built engine on a fixed synthetic batch, with
    each micro-step's masks drawn ahead as the loader's workers draw them in training."""

    def __init__(self, built, cfg, dist):
        self.built, self.cfg, self.dist = built, cfg, dist
        self.gas = built.engine.gradient_accumulation_steps()
        self.batch = synthetic_batch(cfg)
        if dist.device.type == "cuda":          # as the loader hands batches over: pinned, copied non-blocking
            self.batch = {k: v.pin_memory() for k, v in self.batch.items()}
        self.masks = AheadMasks(cfg, dist.rank, self.gas)
        self.step, self.ahead = 0, []

    def draw_ahead(self, steps: int) -> None:
        """The masks of the next `steps` optimizer steps (off the timed path, as in the workers)."""
        first = self.step * self.gas
        pin = (lambda b: {k: v.pin_memory() for k, v in b.items()}) if self.dist.device.type == "cuda" else dict
        self.ahead = [pin(self.masks(dict(self.batch), k)) for k in range(first, first + steps * self.gas)]

    def __call__(self) -> None:
        b = self.built
        for micro in range(self.gas):
            batch = self.ahead.pop(0) if self.ahead else self.batch
            train_step(b.engine, b.teacher, batch, self.cfg, self.step, micro, self.dist, b.dtype)
        self.step += 1


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _time(fn, steps: int, warmup: int, sync, before=None) -> float:
    """Seconds per call of fn() over `steps` calls after `warmup` (before(n) runs untimed first)."""
    for _ in range(warmup):
        fn()
    if before is not None:
        before(steps)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


class _NoEma:
    """The teacher with its EMA update switched off (targets as before): the run beside which the EMA's
    share of the step is measured."""

    def __init__(self, teacher):
        self._teacher = teacher

    def __call__(self, *args, **kwargs):
        return self._teacher(*args, **kwargs)

    def update(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._teacher, name)


def memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_peaks(device: torch.device) -> dict:
    """Peak device memory allocated since `memory_reset` and pinned host memory held (CUDA's caching
    host allocator, where DeepSpeed and the loader pin), in GB; on CPU the process's peak RSS."""
    if device.type == "cuda":
        host = torch.cuda.memory.host_memory_stats()
        return {"device_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "pinned_host_gb": host.get("allocated_bytes.peak", host.get("allocated_bytes.current", 0)) / 1e9}
    import resource
    return {"device_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "pinned_host_gb": 0.0}


def bench_step(preset: str = "vit_base_patch16_debug", steps: int = 10, warmup: int = 2,
               ds_config: str = "ds_configs/zero0.json", compare: str | None = None, breakdown: bool = False,
               peer_batch_size: int = 0, ema_off: bool = True, json_out: str | None = None, **overrides) -> dict:
    """`--peer_batch_size` (default: the student's micro batch) for the timm peer; `--ema_off false`
    skips the run without the EMA; `--json_out PATH` writes the result (rank 0)."""
    ema_off = str(ema_off).lower() not in ("false", "0", "no")
    cfg, ds_over = build_config(preset, None, ds_config=ds_config, **overrides)
    cfg.optim.warmup_steps = 0                      # time real updates, not lr = 0 ones
    with_vocab(cfg)                                 # synthetic ids; the real size comes from the shards
    dist = dist_mod.init()
    built = build_engine(cfg, dist, ds_overrides=ds_over)
    sync = _sync(dist.device)
    step = D2VStep(built, cfg, dist)
    peak = measure_peak_flops(dist.device, matmul_dtype(built.ds))
    executed, by_op = count_flops(step)                              # this rank's FLOPs of one step, as run
    memory_reset(dist.device)
    dt = _time(step, steps, warmup, sync, step.draw_ahead)
    mem = memory_peaks(dist.device)
    dt_no_ema = None
    if ema_off:                                                       # the same run, EMA switched off
        teacher = built.teacher
        built.teacher = _NoEma(teacher)
        try:
            dt_no_ema = _time(step, steps, 1, sync, step.draw_ahead)
        finally:
            built.teacher = teacher
    enc = built.engine.module.encoder
    src = step.batch["source"]
    B, gas = cfg.data.batch_size, step.gas
    # model FLOPs: the work of the step, without activation checkpointing's recompute (flops.py, checked
    # against FlopCounterMode on a step without checkpointing by the tests); executed: counted as run
    model_flops = step_flops_per_sample(cfg, math.prod(enc.token_shape(src)), enc.num_extra_tokens,
                                        src.shape[-1])["total"] * B * gas
    samples = B * gas * dist.world
    ckpt = bool(cfg.model.grad_checkpointing)
    r = {"preset": cfg.preset, "batch": samples, "micro_batch": B, "accumulation": gas, "world": dist.world,
         "clone_batch": cfg.mask.clone_batch, "step_s": dt, "samples_per_s": samples / dt,
         "model_tflop_per_step": model_flops / 1e12, "executed_tflop_per_step": executed / 1e12,
         "flops_py_over_counted": model_flops / executed, "grad_checkpointing": ckpt,
         "achieved_tflops_per_rank": model_flops / dt / 1e12, "peak_tflops_per_rank": peak / 1e12,
         "efficiency": model_flops / dt / peak, "executed_efficiency": executed / dt / peak,
         "mfu": model_flops / dt / peak, "step_s_no_ema": dt_no_ema,
         "ema_exposed": (dt - dt_no_ema) / dt if dt_no_ema else None, **mem,
         "dtype": str(matmul_dtype(built.ds)).replace("torch.", ""), "device": str(dist.device),
         "zero": zero_stage(built.ds), "placement": type(built.teacher).__name__}
    print0(f"\nbench step: {cfg.preset} | micro batch {B} x {cfg.mask.clone_batch} clones x accumulation {gas} x "
           f"{dist.world} ranks | {r['dtype']} on {r['device']} ({torch.get_num_threads()} threads), ZeRO-{r['zero']}, "
           f"{r['placement']}{', activation checkpointing' if ckpt else ''}")
    print0(f"  GEMM peak {peak / 1e12:.3f} TFLOP/s per rank (best of {', '.join(map(str, PEAK_SIZES[dist.device.type if dist.device.type == 'cuda' else 'cpu']))}"
           f" square GEMMs, measured now, same process)")
    rows = [("step time (ms)", dt * 1e3), ("samples/s", samples / dt), ("model GFLOP per step", model_flops / 1e9),
            ("executed GFLOP per step", executed / 1e9), ("model TFLOP/s", model_flops / dt / 1e12),
            ("efficiency (model FLOPs)", r["efficiency"]), ("executed efficiency", r["executed_efficiency"])]
    peer = None
    if compare == "timm":
        peer = _bench_timm(cfg, dist, peer_batch_size or B, steps, warmup, sync, peak)
        r.update({f"peer_{k}": v for k, v in peer.items()}, efficiency_ratio=r["efficiency"] / peer["efficiency"])
        print0(f"  peer: {peer['name']}, batch {peer['batch']}, {'bf16 autocast' if dist.device.type == 'cuda' else 'fp32'},"
               f" AdamW{' (fused)' if dist.device.type == 'cuda' else ''}, no checkpointing (model = executed FLOPs)")
    print0(f"  {'':<26} {'d2v2':>14}" + (f" {'peer':>14}" if peer else ""))
    peer_rows = [peer["step_s"] * 1e3, peer["batch"] / peer["step_s"], peer["flops"] / 1e9, peer["flops"] / 1e9,
                 peer["flops"] / peer["step_s"] / 1e12, peer["efficiency"], peer["efficiency"]] if peer else []
    for i, (name, v) in enumerate(rows):
        cell = (lambda x: efficiency_text(x)) if "efficiency" in name else (lambda x: f"{x:.4g}")
        print0(f"  {name:<26} {cell(v):>14}" + (f" {cell(peer_rows[i]):>14}" if peer else ""))
    if peer:
        print0(f"  efficiency d2v2 / peer (model FLOPs)  {r['efficiency_ratio']:.3f}")
    if dt_no_ema:
        print0(f"  EMA off, same run: step {dt_no_ema * 1e3:.1f} ms; EMA exposed {(dt - dt_no_ema) * 1e3:+.1f} ms"
               f" = {r['ema_exposed']:+.1%} of the step")
    print0(f"  memory: device peak {mem['device_peak_gb']:.2f} GB{' (process RSS)' if dist.device.type != 'cuda' else ''},"
           f" pinned host {mem['pinned_host_gb']:.2f} GB")
    print0(f"  flops.py model FLOPs / executed {model_flops / executed:.3f}"
           f"{' (executed includes the recompute)' if ckpt else ''}; MFU {efficiency_text(r['mfu'])}")
    if r["efficiency"] > 1 or (peer and peer["efficiency"] > 1):
        print0("  an efficiency above 100% means the GEMM peak was under-measured: set the device's rate "
               "(e.g. --run.peak_tflops) or measure at larger sizes")
    if compare == "d2v1":
        r.update(_bench_d2v1(cfg, ds_over, dist, built, dt, steps, warmup, sync))
    if breakdown:
        r["breakdown"] = _breakdown(step, built, dist, sync, steps)
    if json_out and dist.is_main:
        Path(json_out).write_text(json.dumps(r, indent=1, default=str) + "\n")
    return r


def _bench_timm(cfg, dist, batch_size: int, steps: int, warmup: int, sync, peak: float) -> dict:
    torch.manual_seed(cfg.run.seed)
    peer = PeerStep(timm_peer(cfg), dist.device)
    x, labels = peer_batch(cfg, batch_size, dist.device)
    flops, _ = count_flops(lambda: peer(x, labels))
    dt = _time(lambda: peer(x, labels), steps, warmup, sync)
    return {"name": timm_name(cfg), "batch": batch_size, "step_s": dt, "flops": flops, "efficiency": flops / dt / peak}


def d2v1_twin(cfg):
    """The data2vec 1 recipe of cfg's modality (d2v1/presets.py) on the same encoder size, input and
    micro batch: the same number of blocks (data2vec 2.0's prenet + shared), width, heads, MLP ratio."""
    import dataclasses
    from ..presets import get_preset
    name = {"image": "d2v1_vit_base_patch16", "audio": "d2v1_audio_base", "text": "d2v1_text_base"}[cfg.model.modality]
    c1 = get_preset(name)
    m, m1 = cfg.model, c1.model
    sub = {}
    if m.modality == "image":
        sub["image"] = dataclasses.replace(m1.image, img_size=m.image.img_size, patch_size=m.image.patch_size)
        grid = (m.image.img_size // m.image.patch_size) ** 2          # BEiT's 120 of 196, scaled to the grid
        c1.model.d2v1.num_mask_patches = round(grid * 120 / 196)
        c1.model.d2v1.min_mask_patches_per_block = min(16, max(1, grid // 12))
        c1.model.d2v1.max_mask_patches_per_block = grid
    elif m.modality == "audio":
        sub["audio"] = dataclasses.replace(m.audio, use_alibi=False)
    else:
        sub["text"] = m.text
    c1.model = dataclasses.replace(m1, embed_dim=m.embed_dim, depth=m.prenet_depth + m.depth, num_heads=m.num_heads,
                                   mlp_ratio=m.mlp_ratio, average_top_k_layers=min(m1.average_top_k_layers,
                                                                                    m.prenet_depth + m.depth), **sub)
    c1.data = dataclasses.replace(cfg.data)
    c1.optim.warmup_steps = 0
    c1.run = dataclasses.replace(cfg.run)
    c1.teacher.placement = cfg.teacher.placement               # the same teacher layout on both sides
    return c1


def _bench_d2v1(cfg, ds_over, dist, built, dt: float, steps: int, warmup: int, sync) -> dict:
    """The real data2vec 1 model (d2v1/model.py) on the same encoder size and batch, timed the same way."""
    cfg1 = d2v1_twin(cfg)
    with_vocab(cfg1)
    b1 = build_engine(cfg1, dist, ds_overrides=ds_over)
    d2v1 = D2VStep(b1, cfg1, dist)
    dt1 = _time(d2v1, steps, warmup, sync, d2v1.draw_ahead)
    B, M = cfg.data.batch_size * d2v1.gas * dist.world, cfg.mask.clone_batch
    v2, v1 = B * M / dt, B / dt1
    enc = b1.engine.module.encoder
    T = math.prod(enc.token_shape(d2v1.batch["source"]))
    print0(f"\n  data2vec 1 ({cfg1.model.d2v1.recipe}) on the same encoder size ({cfg1.model.depth} blocks, "
           f"{cfg1.model.embed_dim} dims), batch and engine: student sees all {T} tokens, 1 masked view per sample")
    print0(f"  {'':<26} {'d2v2':>12} {'d2v1':>12}")
    print0(f"  {'step time (ms)':<26} {dt * 1e3:>12.1f} {dt1 * 1e3:>12.1f}")
    print0(f"  {'samples/s':<26} {B / dt:>12.4g} {B / dt1:>12.4g}")
    print0(f"  {'masked views/s':<26} {v2:>12.4g} {v1:>12.4g}   (d2v2: {M} views per sample)")
    print0(f"  masked views/s d2v2 / d2v1 {v2 / v1:>10.2f}")
    return {"d2v1_step_s": dt1, "d2v1_preset": cfg1.model.d2v1.recipe, "masked_views_per_s_d2v2": v2,
            "masked_views_per_s_d2v1": v1, "step_time_ratio_d2v2_over_d2v1": dt / dt1,
            "masked_views_per_s_ratio": v2 / v1}


class _Timed:
    """Synchronised wall-clock time of `fn` calls, added to `phases[name]`."""

    def __init__(self, fn, name: str, phases: dict, sync):
        self.fn, self.name, self.phases, self.sync = fn, name, phases, sync

    def __call__(self, *args, **kwargs):
        self.sync()
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.phases[self.name] += time.perf_counter() - t0
        return out


class _TimedTeacher:
    """The teacher with its targets and its EMA update timed; everything else passes through."""

    def __init__(self, teacher, phases: dict, sync):
        self._teacher = teacher
        self.targets = _Timed(teacher.__call__, "teacher targets", phases, sync)
        self.update = _Timed(teacher.update, "EMA update", phases, sync)

    def __call__(self, *args, **kwargs):
        return self.targets(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._teacher, name)


def _breakdown(step: D2VStep, built, dist, sync, steps: int) -> dict:
    """Per-phase times of a step (synchronised around each phase, so they add up to a little more
    than the step's own time) and the top ops of torch.profiler over the same steps."""
    engine, teacher = built.engine, built.teacher
    phases: dict[str, float] = defaultdict(float)
    draw = _Timed(step.draw_ahead, "masks (loader workers, off the step)", phases, sync)
    for name, attr in (("student forward", "forward"), ("backward", "backward"), ("optimizer step", "step")):
        setattr(engine, attr, _Timed(getattr(engine, attr), name, phases, sync))
    built.teacher = _TimedTeacher(teacher, phases, sync)
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            draw(1)
            step()
        total = (time.perf_counter() - t0) / steps
    finally:
        for attr in ("forward", "backward", "step"):
            delattr(engine, attr)
        built.teacher = teacher
    per = {k: v / steps for k, v in phases.items()}
    per["student forward"] -= per.get("teacher targets", 0.0)            # the teacher runs inside it
    per["other (transfers, reductions, lr)"] = total - sum(per.values())
    print0(f"\n  breakdown, synchronised, per optimizer step ({steps} steps, {total * 1e3:.1f} ms each):")
    for k, v in per.items():
        print0(f"    {k:<38} {v * 1e3:9.2f} ms  {v / total:6.1%}")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dist.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step.draw_ahead(steps)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.key_averages()
    if dist.device.type == "cuda":
        busy = sum(e.self_device_time_total for e in events) / 1e6 / steps
        per["device busy share"] = busy / total
        print0(f"    device busy {busy * 1e3:.1f} ms of the {total * 1e3:.1f} ms step ({busy / total:.0%}, profiler)")
        print0("\n  top device ops:\n" + events.table(sort_by="self_device_time_total", row_limit=12))
    print0("\n  top host ops:\n" + events.table(sort_by="self_cpu_time_total", row_limit=12))
    return per
