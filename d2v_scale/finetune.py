"""`d2v finetune` (image classification): cli.py:finetune -> finetune -> finetune_step -> Classifier.
fairseq's `mae_image_classification` recipe (timm RandAugment, Mixup/CutMix + SoftTargetCrossEntropy,
drop path, layer-wise lr decay, warmup + cosine), top-1/top-5 on the validation shards every epoch, the
best kept (checkpoint + `best.safetensors`); engine, pre-flight, checkpoints, resume, metrics as pretraining.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from . import checkpoint
from . import dist as dist_mod
from .config import Config
from .data import DataError, build_loader, eval_codec, finetune_codec
from .dist import Dist, all_reduce_sum, print0
from .dsconfig import zero_stage
from .engine import build_classifier_engine
from .evaluate import EvalStream
from .evaluate.features import eval_loader
from .export import write_weights
from .metrics import Metrics
from .optim import lr_at, set_lr
from .preempt import REQUEUE, TERMINATE, StopRequested, StopSignals, requeue_slurm_job
from .preflight import finetune_preflight
from .masking import seed_for
from .train import TrainingError, is_comm_failure


def build_mixup(cfg, num_classes: int) -> Mixup | None:
    """cfg: FinetuneConfig. timm's Mixup/CutMix with label smoothing, as fairseq builds it (mode batch)."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


# -- one step ----------------------------------------------------------------------------------------

def finetune_step(engine, batch: dict, cfg: Config, step: int, micro: int, dist: Dist, dtype: torch.dtype,
                  mixup: Mixup | None) -> tuple[torch.Tensor, bool]:
    """One micro-batch: mix, forward, soft-target (or label-smoothed) cross-entropy, backward, step."""
    x = batch["source"].to(dist.device, non_blocking=True)                      # (B, 3, H, W)
    y = batch["label"].to(dist.device)                                          # (B,)

    # Mixup draws from numpy, drop path from torch: both reproducible from (seed, step, micro-step, rank)
    seed = seed_for(cfg.run.seed, step, micro, dist.rank)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.manual_seed(seed)
    target = y
    if mixup is not None:
        x, target = mixup(x, y)                                                 # (B, C) soft targets

    set_lr(engine.optimizer, lr_at(step, cfg.optim))                            # x each group's layer-decay scale
    logits = engine(x.to(dtype)).float()                                        # (B, C)
    if mixup is not None:
        loss = SoftTargetCrossEntropy()(logits, target)
    else:
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.finetune.label_smoothing)

    boundary = engine.is_gradient_accumulation_boundary()                       # ask before step()
    engine.backward(loss)
    engine.step()
    return loss.detach(), boundary


@torch.no_grad()
def validate(engine, stream: EvalStream, dist: Dist, dtype: torch.dtype, num_workers: int) -> dict[str, float]:
    """Top-1/top-5 (top-C with fewer classes) and the loss over every validation sample, on all ranks."""
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)                                  # top1, top5, loss, samples
    for batch in eval_loader(stream, num_workers):
        if "error" in batch:
            raise DataError(batch["error"])
        logits = engine(batch["source"].to(dist.device).to(dtype)).float().cpu()   # (B, C)
        y = batch["label"]
        keep = y >= 0                                                           # padding batches: -1
        logits, y = logits[keep], y[keep]
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.tensor([float((ranked[:, 0] == y).sum()), float((ranked == y[:, None]).any(1).sum()),
                              float(F.cross_entropy(logits, y, reduction="sum")) if len(y) else 0.0, float(len(y))],
                             dtype=torch.float64)
    engine.train()
    top1, top5, loss, n = all_reduce_sum(sums.to(dist.device)).cpu().tolist()
    return {"val/top1": 100 * top1 / n, "val/top5": 100 * top5 / n, "val/loss": loss / n}


# -- the run ---------------------------------------------------------------------------------------------

def finetune(cfg: Config, ds_overrides: dict | None = None) -> dict:
    plan = finetune_preflight(cfg, ds_overrides, int(os.environ.get("WORLD_SIZE", "1")), every_shard=False)
    ds, resumed = plan.ds, plan.resume
    dist = dist_mod.init()
    run_dir = Path(cfg.run.out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(run_dir / "config.json", cfg.to_dict())
        checkpoint.write_json(run_dir / "ds_config.json", ds)
        for note in plan.notes + (["resuming with changed settings: " + "; ".join(plan.changed)] if plan.changed else []):
            print0(f"d2v: {note}")
        for name in checkpoint.set_aside(resumed) if resumed else []:
            print0(f"d2v: passed over a broken checkpoint; kept as {name}")

    built = build_classifier_engine(cfg, dist, ds, plan.weights, plan.num_classes)
    engine, dtype = built.engine, built.dtype
    best = {"top1": -1.0, "step": 0}
    data_state = None
    if resumed:
        client, data_state = checkpoint.load(engine, None, resumed.ckpt_dir, resumed.tag, dist.rank)
        best = {"top1": client.get("best_top1", -1.0), "step": client.get("best_step", 0)}
        print0(f"resumed from {resumed.path} at step {engine.global_steps}")
    loader = build_loader(cfg, dist.rank, dist.world, data_state, urls=plan.shards.urls,
                          codec=finetune_codec(cfg, plan.num_classes))
    val = EvalStream(plan.val, eval_codec(cfg, plan.num_classes), cfg.data.batch_size, dist.rank, dist.world)
    mixup = build_mixup(cfg.finetune, plan.num_classes)

    stop = min(cfg.optim.max_steps, cfg.run.stop_after or cfg.optim.max_steps)
    gas = engine.gradient_accumulation_steps()
    every = cfg.finetune.eval_every or max(1, loader.batches_per_epoch // gas)
    metrics = Metrics(run_dir, dist.is_main, dist.world, engine.global_steps, stop, 0.0, cfg.run.progress)
    print0(f"d2v_scale finetune: {cfg.preset or 'custom'} | {cfg.finetune.task} | {built.n_params / 1e6:.2f}M params "
           f"| {plan.num_classes} classes | world {dist.world} x micro {cfg.data.batch_size} x accum {gas} | ZeRO-"
           f"{zero_stage(ds)} | {str(dtype).replace('torch.', '')} | validation every {every} steps "
           f"({plan.val.samples} samples) | steps {engine.global_steps} -> {stop}")
    signals = StopSignals(dist.rank, cfg.run.stop_timeout_s,
                          lambda: checkpoint.latest_tag(run_dir / checkpoint.CKPT_DIR))
    try:
        last_saved, best = _loop(engine, loader, val, cfg, dist, dtype, mixup, metrics, signals, run_dir, stop,
                                 every, best)
    except (RuntimeError, torch.distributed.DistBackendError) as e:
        if not is_comm_failure(e):
            raise
        latest = checkpoint.latest_tag(run_dir / checkpoint.CKPT_DIR)
        raise TrainingError(f"rank {dist.rank} lost contact with another rank ({type(e).__name__}: {str(e)[:200]}); "
                            f"the last complete checkpoint is {latest}; rerun with --resume auto") from None
    summary = metrics.close(engine.global_steps, run_dir, str(last_saved) if last_saved else None,
                            {"best_step": best["step"], "best_weights": str(run_dir / "best.safetensors")})
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _loop(engine, loader, val, cfg, dist, dtype, mixup, metrics, signals, run_dir, stop, every, best):
    last_saved, micro, window, t0 = None, 0, torch.zeros(2, dtype=torch.float64), time.perf_counter()
    for batch in loader:
        step = engine.global_steps
        if step >= stop:
            break
        loss, boundary = finetune_step(engine, batch, cfg, step, micro, dist, dtype, mixup)
        window += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        micro = 0 if boundary else micro + 1
        if not boundary:
            continue
        step = engine.global_steps
        metrics.advance()
        seen = all_reduce_sum(signals.flags.clone().to(dist.device)).cpu()     # every rank learns of a signal
        stop_now = bool(seen.sum() > 0)
        new_best, v = False, {}
        if step % every == 0 or step == stop:
            t_val = time.perf_counter()
            v = validate(engine, val, dist, dtype, cfg.data.num_workers)
            t0 += time.perf_counter() - t_val                           # validation is not training throughput
            new_best = v["val/top1"] > best["top1"]
            if new_best:
                best = {"top1": v["val/top1"], "step": step}
            v["val/best_top1"] = best["top1"]
            print0(f"validation step {step}: top-1 {v['val/top1']:.2f} top-5 {v['val/top5']:.2f} loss "
                   f"{v['val/loss']:.4f} (best {best['top1']:.2f} at step {best['step']})")
        if step % cfg.run.log_every == 0 or step == stop:                # validation joins the step's row
            total = all_reduce_sum(window.to(dist.device)).cpu()
            dt, t0 = time.perf_counter() - t0, time.perf_counter()
            m = {"train/loss": float(total[0] / total[1]), "train/lr": lr_at(step - 1, cfg.optim),
                 "perf/samples_per_s": float(total[1]) * cfg.data.batch_size / max(dt, 1e-9)}
            if not np.isfinite(m["train/loss"]):
                raise TrainingError(f"loss is {m['train/loss']} at step {step}: lower --optim.lr or set "
                                    "--optim.clip_grad, and resume from the last checkpoint")
            metrics.record(step, {**m, **v})
            print0(f"step {step} loss {m['train/loss']:.4f} lr {m['train/lr']:.2e} {m['perf/samples_per_s']:.1f} samples/s")
            window.zero_()
        elif v:
            metrics.scalars(step, v)
        if stop_now:
            signals.acknowledge()
        if step % cfg.run.save_every == 0 or step == stop or stop_now or new_best:
            tag = f"step_{best['step']:08d}" if best["step"] else None
            last_saved = checkpoint.save(engine, None, run_dir, step, {"step": step, "preset": cfg.preset,
                                         "task": cfg.finetune.task, "best_top1": best["top1"],
                                         "best_step": best["step"]}, loader.state_dict(), dist.rank,
                                         cfg.run.keep_last, best=tag)
            if new_best and dist.is_main:
                export_best(run_dir, last_saved.name, cfg, best)
        if stop_now:
            requeue = seen[REQUEUE] > 0 and not seen[TERMINATE] > 0
            note = requeue_slurm_job() if requeue and dist.is_main else ""
            print0(f"d2v: stopped by a signal at step {step}; checkpoint {last_saved}. {note}")
            metrics.close(step, run_dir, str(last_saved))
            raise StopRequested(0 if requeue else 143)
    return last_saved, best


def export_best(run_dir: Path, tag: str, cfg: Config, best: dict) -> None:
    """best.safetensors: the consolidated fp32 classifier (encoder + fc_norm + head) of checkpoint `tag`."""
    state, _ = checkpoint.consolidated_state(run_dir, tag, quiet=True)
    info = {"num_classes": int(state["head.weight"].shape[0]), "val_top1": best["top1"], "step": best["step"],
            "task": cfg.finetune.task}
    write_weights(run_dir / "best.safetensors", state, cfg.to_dict(), "classifier", info)
