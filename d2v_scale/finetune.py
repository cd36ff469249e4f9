"""`d2v finetune --task NAME`: cli.py:finetune -> finetune -> finetune_step -> Task.loss (tasks/).

The loop every task shares: the pre-flight (the task checks its data), the engine (the task's model,
layer-wise lr decay), seeded micro-steps, validation every epoch (or `finetune.eval_every` steps) on
the task's metric, the best kept from pruning (checkpoint + `best.safetensors`), checkpoints, exact
resume, Slurm signals, metrics and the summary as in pretraining.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from . import dist as dist_mod
from . import runlock
from .config import Config
from .data import build_loader
from .dist import Dist, all_reduce_sum, print0
from .dsconfig import zero_stage
from .engine import build_finetune_engine
from .evaluate import EvalStream
from .export import write_weights
from .metrics import Metrics
from .optim import lr_at, set_lr
from .preempt import StopSignals, stopped
from .shared_dir import prove_shared
from .preflight import finetune_preflight
from .run_end import TrainingError, run_end
from .masking import seed_for
from .tasks import Task


# -- one step ----------------------------------------------------------------------------------------

def finetune_step(engine, task: Task, batch: dict, cfg: Config, step: int, micro: int, dist: Dist,
                  dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """One micro-batch: seed, the task's loss, backward, step."""
    # the task's randomness (mixup: numpy, drop path and masks: torch) reproducible from
    # (seed, step, micro-step, rank), so a resumed run takes the uninterrupted one's steps
    seed = seed_for(cfg.run.seed, step, micro, dist.rank)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.manual_seed(seed)
    set_lr(engine.optimizer, lr_at(step, cfg.optim))                            # x each group's layer-decay scale
    loss = task.loss(engine, batch, step, dist, dtype)
    boundary = engine.is_gradient_accumulation_boundary()                       # ask before step()
    engine.backward(loss)
    engine.step()
    return loss.detach(), boundary


def validate(engine, task: Task, stream: EvalStream, dist: Dist, dtype: torch.dtype, num_workers: int) -> dict:
    engine.eval()
    try:
        return task.validate(engine, stream, dist, dtype, num_workers)
    finally:
        engine.train()


# -- the run ---------------------------------------------------------------------------------------------

def finetune(cfg: Config, ds_overrides: dict | None = None) -> dict:
    plan = finetune_preflight(cfg, ds_overrides, int(os.environ.get("WORLD_SIZE", "1")), every_shard=False)
    dist = dist_mod.init()
    with runlock.hold(Path(cfg.run.out), dist):            # one run per --out, released on any exit
        return _finetune(cfg, plan, dist)


def _finetune(cfg: Config, plan, dist: Dist) -> dict:
    ds, resumed, task = plan.ds, plan.resume, plan.task
    run_dir = Path(cfg.run.out)
    prove_shared(run_dir, dist.rank)                                   # before anything is read or written
    if dist.is_main:
        for said in plan.notes + checkpoint.open_run(run_dir, cfg.to_dict(), ds, resumed) + (
                ["resuming with changed settings: " + "; ".join(plan.changed)] if plan.changed else []):
            print0(f"d2v: {said}")
        task.save_files(run_dir)

    built = build_finetune_engine(cfg, ds, task.build_model(plan.weights))
    engine, dtype = built.engine, built.dtype
    best = {"value": None, "step": 0}
    data_state = None
    if resumed:
        client, data_state = checkpoint.load(engine, None, resumed.ckpt_dir, resumed.tag, dist.rank)
        best = {"value": client.get("best_value"), "step": client.get("best_step", 0)}
        print0(f"resumed from {resumed.path} at step {engine.global_steps}")
    loader = build_loader(cfg, dist.rank, dist.world, data_state, urls=plan.shards.urls,
                          codec=task.train_codec())
    val = EvalStream(plan.val, task.val_codec(), cfg.data.batch_size, dist.rank, dist.world)

    stop = min(cfg.optim.max_steps, cfg.run.stop_after or cfg.optim.max_steps)
    gas = engine.gradient_accumulation_steps()
    every = cfg.finetune.eval_every or max(1, loader.batches_per_epoch // gas)
    metrics = Metrics(run_dir, dist.is_main, dist.world, engine.global_steps, stop, 0.0, cfg.run.progress)
    print0(f"d2v_scale finetune: {cfg.preset or 'custom'} | {cfg.finetune.task} | {built.n_params / 1e6:.2f}M params "
           f"| {task.describe()} | world {dist.world} x micro {cfg.data.batch_size} x accum {gas} | ZeRO-"
           f"{zero_stage(ds)} | {str(dtype).replace('torch.', '')} | validation every {every} steps "
           f"({plan.val.samples} samples) | steps {engine.global_steps} -> {stop}")
    signals = StopSignals(dist.rank, cfg.run.stop_timeout_s,
                          lambda: checkpoint.latest_tag(run_dir / checkpoint.CKPT_DIR), run_dir / "logs")
    loader.stop_pending = signals.requested

    def save(step: int) -> Path:          # at a step's boundary: the loader's state gives back a half window
        tag = f"step_{best['step']:08d}" if best["step"] else None
        return checkpoint.save(engine, None, run_dir, step, {"step": step, "preset": cfg.preset,
                               "task": cfg.finetune.task, "best_value": best["value"], "best_step": best["step"]},
                               loader.boundary_state(gas), dist.rank, cfg.run.keep_last, best=tag)

    with run_end(run_dir, dist.rank, engine, signals, metrics, save):
        last_saved = _loop(engine, task, loader, val, cfg, dist, dtype, metrics, signals, save, run_dir, stop,
                           every, best)
    summary = metrics.close(engine.global_steps, run_dir, str(last_saved) if last_saved else None,
                            {"best_step": best["step"], "best_weights": str(run_dir / "best.safetensors")})
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _loop(engine, task, loader, val, cfg, dist, dtype, metrics, signals, save, run_dir, stop, every, best):
    """`best` ({value, step}) is updated in place: a checkpoint taken on the way out holds it."""
    last_saved, micro, window, t0 = None, 0, torch.zeros(2, dtype=torch.float64), time.perf_counter()
    for batch in loader:
        step = engine.global_steps
        if step >= stop:
            break
        loss, boundary = finetune_step(engine, task, batch, cfg, step, micro, dist, dtype)
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
            v = validate(engine, task, val, dist, dtype, cfg.data.num_workers)
            t0 += time.perf_counter() - t_val                           # validation is not training throughput
            new_best = task.better(v[task.metric], best["value"])
            if new_best:
                best.update(value=v[task.metric], step=step)
            name = task.metric.split("/")[-1]
            v[f"val/best_{name}"] = best["value"]
            print0(f"validation step {step}: " + " ".join(f"{k.split('/')[-1]} {x:.4g}" for k, x in v.items()
                                                          if not k.startswith("val/best_"))
                   + f" (best {name} {best['value']:.4g} at step {best['step']})")
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
            last_saved = save(step)
            if new_best and dist.is_main:
                export_best(run_dir, last_saved.name, cfg, task, best)
        if stop_now:
            stop_exit = stopped(seen, step, last_saved, dist.is_main)
            metrics.close(step, run_dir, str(last_saved))
            raise stop_exit
    return last_saved


def export_best(run_dir: Path, tag: str, cfg: Config, task: Task, best: dict) -> None:
    """best.safetensors: the consolidated fp32 model (encoder + the task's head) of checkpoint `tag`."""
    state, _ = checkpoint.consolidated_state(run_dir, tag, quiet=True)
    info = {**task.export_info(state), f"val_{task.metric.split('/')[-1]}": best["value"], "step": best["step"],
            "task": cfg.finetune.task}
    write_weights(run_dir / "best.safetensors", state, cfg.to_dict(), task.export_kind, info)
