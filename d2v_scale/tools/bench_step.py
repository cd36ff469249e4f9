"""`d2v bench step`: the data2vec 2.0 training step through the DeepSpeed engine on synthetic batches.

  d2v bench step --preset vit_base_patch16 [--compare timm|d2v1] [--breakdown] [--steps 10] [--key=value ...]

The step (forward with the teacher's targets, backward, optimizer step, EMA; masks drawn ahead as the
loader's workers draw them) is timed, and its FLOPs are counted on one real step by torch's
FlopCounterMode (flops.count_flops), so the efficiency printed does not rest on flops.py's formulas;
flops.py's model FLOPs and MFU are printed beside them. `--compare timm` times a plain supervised
timm ViT of the same width, depth and patch (or timm Blocks on the same tokens for audio/text) in the
same process and prints efficiency(d2v2) / efficiency(peer); `--compare d2v1` the real data2vec 1
model (d2v1/) of the same encoder size, masked views per second side by side.
`--breakdown` adds synchronised per-phase times and the top device and host ops of torch.profiler.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from .. import dist as dist_mod
from ..config import with_vocab
from ..data import synthetic_batch
from ..dist import print0
from ..dsconfig import matmul_dtype, zero_stage
from ..engine import build_engine
from ..flops import count_flops, step_flops_per_sample
from ..masking import AheadMasks
from ..metrics import measure_peak_flops
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
        self.masks = AheadMasks(cfg, dist.rank, self.gas)
        self.step, self.ahead = 0, []

    def draw_ahead(self, steps: int) -> None:
        """The masks of the next `steps` optimizer steps (off the timed path, as in the workers)."""
        first = self.step * self.gas
        self.ahead = [self.masks(dict(self.batch), k) for k in range(first, first + steps * self.gas)]

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


def bench_step(preset: str = "vit_base_patch16_debug", steps: int = 10, warmup: int = 2,
               ds_config: str = "ds_configs/zero0.json", compare: str | None = None, breakdown: bool = False,
               peer_batch_size: int = 0, **overrides) -> dict:
    """`--peer_batch_size` (default: the student's micro batch) for the timm peer."""
    cfg, ds_over = build_config(preset, None, ds_config=ds_config, **overrides)
    cfg.optim.warmup_steps = 0                      # time real updates, not lr = 0 ones
    with_vocab(cfg)                                 # synthetic ids; the real size comes from the shards
    dist = dist_mod.init()
    built = build_engine(cfg, dist, ds_overrides=ds_over)
    sync = _sync(dist.device)
    step = D2VStep(built, cfg, dist)
    peak = measure_peak_flops(dist.device, matmul_dtype(built.ds))
    counted, by_op = count_flops(step)                               # this rank's FLOPs of one step
    dt = _time(step, steps, warmup, sync, step.draw_ahead)
    enc = built.engine.module.encoder
    src = step.batch["source"]
    B, gas = cfg.data.batch_size, step.gas
    model_flops = step_flops_per_sample(cfg, math.prod(enc.token_shape(src)), enc.num_extra_tokens,
                                        src.shape[-1])["total"] * B * gas
    samples = B * gas * dist.world
    r = {"preset": cfg.preset, "batch": samples, "clone_batch": cfg.mask.clone_batch, "step_s": dt,
         "samples_per_s": samples / dt, "counted_tflop_per_step": counted / 1e12,
         "flops_py_over_counted": model_flops / counted, "achieved_tflops_per_rank": counted / dt / 1e12,
         "peak_tflops_per_rank": peak / 1e12, "efficiency": counted / dt / peak, "mfu": model_flops / dt / peak,
         "dtype": str(matmul_dtype(built.ds)).replace("torch.", ""), "device": str(dist.device), "zero": zero_stage(built.ds)}
    print0(f"\nbench step: {cfg.preset} | micro batch {B} x {cfg.mask.clone_batch} clones x accumulation {gas} x "
           f"{dist.world} ranks | {r['dtype']} on {r['device']} ({torch.get_num_threads()} threads), ZeRO-{r['zero']}")
    print0(f"  GEMM peak {peak / 1e12:.3f} TFLOP/s per rank (measured now, same process)")
    rows = [("step time (ms)", dt * 1e3), ("samples/s", samples / dt), ("GFLOP per step (counted)", counted / 1e9),
            ("achieved TFLOP/s", counted / dt / 1e12), ("efficiency (of peak)", counted / dt / peak)]
    peer = None
    if compare == "timm":
        peer = _bench_timm(cfg, dist, peer_batch_size or B, steps, warmup, sync, peak)
        r.update({f"peer_{k}": v for k, v in peer.items()}, efficiency_ratio=r["efficiency"] / peer["efficiency"])
        print0(f"  peer: {peer['name']}, batch {peer['batch']}, {'bf16 autocast' if dist.device.type == 'cuda' else 'fp32'},"
               f" AdamW{' (fused)' if dist.device.type == 'cuda' else ''}")
    print0(f"  {'':<26} {'d2v2':>12}" + (f" {'peer':>12}" if peer else ""))
    peer_rows = [peer["step_s"] * 1e3, peer["batch"] / peer["step_s"], peer["flops"] / 1e9,
                 peer["flops"] / peer["step_s"] / 1e12, peer["efficiency"]] if peer else []
    for i, (name, v) in enumerate(rows):
        fmt = ".1%" if "efficiency" in name else ".4g"
        print0(f"  {name:<26} {v:>12{fmt}}" + (f" {peer_rows[i]:>12{fmt}}" if peer else ""))
    if peer:
        print0(f"  efficiency d2v2 / peer    {r['efficiency_ratio']:>12.3f}")
    print0(f"  flops.py model FLOPs / counted {model_flops / counted:.3f}; MFU (flops.py) {r['mfu']:.1%}")
    if compare == "d2v1":
        r.update(_bench_d2v1(cfg, ds_over, dist, built, dt, steps, warmup, sync))
    if breakdown:
        r["breakdown"] = _breakdown(step, built, dist, sync, steps)
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
