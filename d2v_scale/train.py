"""The training loop: `train(cfg)` sets up, `train_step(...)` is one data2vec 2.0 micro-step.

cli.py:train -> train.py:train -> train_step -> Data2Vec.forward (d2v.py) -> encoder/decoder.
DeepSpeed wraps only the student (encoder + decoder + loss); the EMA teacher stays outside the engine.
Masks, dropout and the decoder noise are seeded from (seed, step, micro-step, rank), so a resumed
run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import torch

from . import checkpoint
from . import dist as dist_mod
from . import runlock
from .config import Config
from .data import build_loader
from .dist import Dist, all_reduce_sum, device_scalar, print0
from .dsconfig import bf16_accumulation_warning, matmul_dtype, zero_stage
from .engine import build_engine
from .evaluate import KnnMonitor
from .flops import step_flops_per_sample
from .masking import AheadMasks, MaskInfo, seed_for, step_masks
from .memory import window_size
from .metrics import Metrics, measure_peak_flops
from .optim import lr_at, set_lr
from .preempt import StopSignals, restart_banner, stopped
from .preflight import preflight
from .run_end import TrainingError, run_end
from .shared_dir import prove_shared
from .teacher import decay_at


# -- one step ----------------------------------------------------------------------------------------

def train_step(engine, teacher, batch: dict, cfg: Config, step: int, micro: int, dist: Dist,
               dtype: torch.dtype, mask: torch.Tensor | None = None,
               stop_flags: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> tuple[dict, bool]:
    """One micro-batch: student forward (teacher targets inside, or `targets` (B, T, D) from the window's
    teacher pass), backward, step, EMA. The masks come with the batch (drawn ahead in the loader's
    workers) or are drawn here, both from (seed, step, micro-step, rank); `mask` (B*M, T) replaces them
    (fairseq's precomputed_mask). `stop_flags` (2,) are this rank's signal flags, returned summed over
    ranks in out["stop"], on the device: nothing here waits for the device."""
    encoder = engine.module.encoder
    padded = encoder.has_padding(batch["source"], batch.get("padding_mask"))   # read on the host, where it was made
    x = batch["source"].to(dist.device, non_blocking=True)             # image (B,3,H,W) | audio (B,S) | text (B,T)
    if x.is_floating_point():
        x = x.to(dtype)
    pad = batch.get("padding_mask") if padded else None
    pad = pad.to(dist.device, non_blocking=True) if pad is not None else None
    M = cfg.mask.clone_batch

    # masks and dropout: reproducible from (seed, step, micro-step, rank)
    torch.manual_seed(seed_for(cfg.run.seed, step, micro, dist.rank, 1))
    info = MaskInfo.from_mask(mask) if mask is not None else MaskInfo.from_batch(batch, step, micro)
    if info is None:
        info = step_masks(cfg, x.shape[0] * M, encoder.token_shape(x, pad), step, micro, dist.rank, batch["source"],
                          batch.get("padding_mask"))
    info = info.to(dist.device)                                        # (B*M, T) masks and indices
    layer_keep = encoder.draw_layerdrop(seed_for(cfg.run.seed, step, micro))   # same on every rank

    # forward: student on the visible tokens of M clones, teacher targets once per sample
    set_lr(engine.optimizer, lr_at(step, cfg.optim))
    out = engine(x, info, teacher if targets is None else (lambda *_: targets), pad, layer_keep, padded=padded)

    # loss = mean over every masked token on every rank (DeepSpeed averages gradients over ranks);
    # the same all-reduce carries the stop-signal flags, so every rank learns of a signal together
    flags = stop_flags.tolist() if stop_flags is not None else [0.0, 0.0]
    counts = all_reduce_sum(torch.stack([device_scalar(v, dist.device) for v in [out["sample_size"], *flags]]))
    out["stop"] = counts[1:]
    loss = out["loss"] * dist.world / counts[0].clamp_min(1)

    boundary = engine.is_gradient_accumulation_boundary()              # ask before step()
    engine.backward(loss)
    engine.step()
    if boundary and engine.was_step_applied():                          # EMA once per optimizer step
        teacher.update(encoder, decay_at(engine.global_steps, cfg.teacher))
    return out, boundary


# -- the loop ------------------------------------------------------------------------------------------

def train(cfg: Config, ds_overrides: dict | None = None) -> dict:
    # every check before the ranks wait on each other; nothing is written before it passed
    plan = preflight(cfg, ds_overrides, int(os.environ.get("WORLD_SIZE", "1")), every_shard=False)
    dist = dist_mod.init()
    with runlock.hold(Path(cfg.run.out), dist):            # one run per --out, released on any exit
        return _train(cfg, plan, dist, ds_overrides)


def _train(cfg: Config, plan, dist: Dist, ds_overrides: dict | None) -> dict:
    ds, resumed = plan.ds, plan.resume
    run_dir = Path(cfg.run.out)
    prove_shared(run_dir, dist.rank)                                   # before anything is read or written
    if dist.is_main:
        for said in checkpoint.open_run(run_dir, cfg.to_dict(), ds, resumed) + (
                ["resuming with changed settings: " + "; ".join(plan.changed)] if plan.changed else []):
            print0(f"d2v: {said}")
        warning = bf16_accumulation_warning(cfg, dist.world, ds_overrides)
        if warning:
            print0(f"d2v: warning: {warning}")

    # student engine and EMA teacher (identical init on every rank)
    built = build_engine(cfg, dist, ds)
    engine, teacher, dtype = built.engine, built.teacher, built.dtype

    # resume
    data_state = None
    if resumed:
        client, data_state = checkpoint.load(engine, teacher, resumed.ckpt_dir, resumed.tag, dist.rank)
        teacher.updates = client.get("ema_updates", 0)
        print0(f"resumed from {resumed.path} at step {engine.global_steps}")
    elif cfg.run.resume == "auto":
        print0("no checkpoint to resume from: starting from scratch")
    urls = plan.shards.urls
    loader = build_loader(cfg, dist.rank, dist.world, data_state, urls=urls,
                          prepare=AheadMasks(cfg, dist.rank, engine.gradient_accumulation_steps()))
    monitor = KnnMonitor(cfg, dist, plan.eval_bank, plan.eval_queries) if plan.eval_bank else None

    stop = min(cfg.optim.max_steps, cfg.run.stop_after or cfg.optim.max_steps)
    peak = cfg.run.peak_tflops * 1e12 or measure_peak_flops(dist.device, matmul_dtype(ds))
    metrics = Metrics(run_dir, dist.is_main, dist.world, engine.global_steps, stop, peak, cfg.run.progress)
    encoder = engine.module.encoder
    gas = engine.gradient_accumulation_steps()
    print0(f"d2v_scale: {cfg.preset or 'custom'} | {built.n_params / 1e6:.2f}M student "
           f"params | world {dist.world} x micro {cfg.data.batch_size} x accum {gas} | ZeRO-"
           f"{zero_stage(ds)} | {str(matmul_dtype(ds)).replace('torch.', '')}"
           f"{' autocast' if matmul_dtype(ds) != dtype else ''} | "
           f"{len(urls)} shards | teacher {getattr(teacher, 'placement', 'replicated')} | steps "
           f"{engine.global_steps} -> {stop}")

    signals = StopSignals(dist.rank, cfg.run.stop_timeout_s,
                          lambda: checkpoint.latest_tag(run_dir / checkpoint.CKPT_DIR), run_dir / "logs")
    if restart_banner():
        print0(restart_banner())
    loader.stop_pending = signals.requested

    def save(step: int) -> Path:          # at a step's boundary: the loader's state gives back a half window
        return checkpoint.save(engine, teacher, run_dir, step, {"step": step, "preset": cfg.preset,
                               "ema_updates": teacher.updates},
                               loader.boundary_state(engine.gradient_accumulation_steps()), dist.rank, cfg.run.keep_last)

    with run_end(run_dir, dist.rank, engine, signals, metrics, save):
        last_saved = _loop(engine, teacher, loader, cfg, dist, dtype, metrics, signals, save, run_dir, stop, encoder,
                           monitor)
    summary = metrics.close(engine.global_steps, run_dir, str(last_saved) if last_saved else None)
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def with_targets(loader, teacher, window: int, gas: int, dist: Dist, dtype: torch.dtype):
    """(batch, targets) of each micro-step: the targets of up to `window` micro-batches of one
    accumulation window from one teacher pass (each block gathered once), computed when the first of
    them is asked for, after the previous optimizer step's EMA; (batch, None) with `window` 1 (the
    teacher then runs inside the student's forward)."""
    it, pos = iter(loader), 0
    while True:
        chunk = list(itertools.islice(it, min(window, gas - pos) if window > 1 else 1))
        if not chunk:
            return
        ys = [None] * len(chunk)
        if window > 1:
            for b in chunk:                                              # image (B, 3, H, W) on the device
                b["source"] = b["source"].to(dist.device, non_blocking=True).to(dtype)
            ys = teacher.window([(b["source"], None, None) for b in chunk])   # (B, T, D) fp32 each
        pos = (pos + len(chunk)) % gas
        yield from zip(chunk, ys)


def _loop(engine, teacher, loader, cfg, dist, dtype, metrics, signals, save, run_dir, stop, encoder, monitor):
    last_saved, micro, out = None, 0, None
    gas = engine.gradient_accumulation_steps()
    window = window_size(cfg, cfg.data.batch_size, gas, torch.finfo(dtype).bits // 8)
    for batch, targets in with_targets(loader, teacher, window, gas, dist, dtype):
        step = engine.global_steps
        if step >= stop:
            break
        out, boundary = train_step(engine, teacher, batch, cfg, step, micro, dist, dtype, stop_flags=signals.flags,
                                   targets=targets)
        src = batch["source"]
        tokens = math.prod(encoder.token_shape(src))
        flops = step_flops_per_sample(cfg, tokens, encoder.num_extra_tokens, src.shape[-1])["total"] * src.shape[0]
        metrics.update(out, src.shape[0], flops)
        micro = 0 if boundary else micro + 1
        if not boundary:
            continue
        step = engine.global_steps
        metrics.advance()
        evals = {}
        if monitor is not None and step % cfg.eval.every == 0:      # kNN of student and teacher, RNG untouched
            seconds = monitor.seconds
            evals = monitor(encoder, teacher, dtype)
            metrics.pause(monitor.seconds - seconds)
            print0(f"eval step {step}: kNN top-1 student {evals['eval/knn_top1_student']:.2f} teacher "
                   f"{evals['eval/knn_top1_teacher']:.2f} ({monitor.seconds - seconds:.1f}s)")
        if step % cfg.run.log_every == 0 or step == stop:
            m = metrics.log(step, lr_at(step - 1, cfg.optim), decay_at(step, cfg.teacher),
                            {"data/skipped_samples": loader.state["skipped"],
                             "data/unreadable_shards": loader.state["read_errors"], **evals})
            _check_health(m, step, cfg)
        agreed = signals.agreed(out["stop"])                           # flags of the previous step
        stop_now = bool(agreed.sum() > 0)
        if stop_now:
            signals.acknowledge()
        if step % cfg.run.save_every == 0 or step == stop or stop_now:
            last_saved = save(step)
        if stop_now:
            stop_exit = stopped(agreed, step, last_saved, dist.is_main)
            metrics.close(step, run_dir, str(last_saved))
            raise stop_exit
    return last_saved


def _check_health(m: dict, step: int, cfg: Config) -> None:
    """Same values on every rank (they were all-reduced), so every rank stops together."""
    if not math.isfinite(m["train/loss"]):
        raise TrainingError(f"loss is {m['train/loss']} at step {step}: lower --optim.lr, keep gradient "
                            f"clipping on (--optim.clip_grad), and resume from the last checkpoint")
    r = cfg.run
    if step > r.collapse_guard_after:
        if r.min_target_var > 0 and m["train/target_var"] < r.min_target_var:
            raise TrainingError(
                f"target_var {m['train/target_var']:.4f} < run.min_target_var {r.min_target_var} at step {step}: "
                "the teacher's targets collapsed. Lower --optim.lr (fairseq issue 4177 recovered with 7.5e-4 -> "
                "5e-4) and resume from an earlier checkpoint, or set --run.min_target_var=0 to continue anyway")
        if r.min_pred_var > 0 and m["train/pred_var"] < r.min_pred_var:
            raise TrainingError(
                f"pred_var {m['train/pred_var']:.4f} < run.min_pred_var {r.min_pred_var} at step {step}: the "
                "student's predictions collapsed. Lower --optim.lr and resume from an earlier checkpoint, or "
                "set --run.min_pred_var=0 to continue anyway")
