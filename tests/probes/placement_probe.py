"""Run by tests/test_teacher_scale.py under the deepspeed launcher (2 CPU ranks, ZeRO-3, fp32).

Every teacher placement trains the same 4 optimizer steps of vit_base_patch16_debug with gradient
accumulation (2 micro-steps per rank), fixed global batches and masks, the targets of each window from
one teacher pass (train.with_targets, as `d2v train` runs it), and saves a checkpoint at step 2. Then:
  * the replicated teacher once more with a pass per micro-step (targets inside the student's forward);
  * three placements resumed from the step-2 checkpoint another placement wrote, to step 4;
  * a build with `--run.init_from` an encoder-only file (its teacher must be the loaded weights);
  * after every step a reader (`teacher.reading()`, what the kNN monitor uses) extracts features while
    the blend of that step runs in a background thread, held back on purpose (`delay` seconds), so a
    reader that did not wait would see the previous teacher.
Rank 0 writes the losses of every micro-step, the final teachers, the readers' features and the bytes
each partitioned teacher counted per optimizer step (and what teacher/placement.py plans for them).

Then data2vec 1 (`d2v1`): the debug preset of each modality trains 2 optimizer steps (2 micro-steps per
rank, a teacher pass per micro-step inside the student's forward, dropout and masks drawn as `d2v
train` draws them, a padded utterance in each audio micro-batch) with every placement, checkpointing
at step 1; one placement per modality resumes from another's checkpoint. Rank 0 writes
d2v1_summary.json and d2v1_teachers.pt the same way.
"""
import json
import sys
import time
from pathlib import Path

import torch

from d2v_scale import checkpoint
from d2v_scale import dist as dist_mod
from d2v_scale.d2v import Data2Vec
from d2v_scale.engine import build_engine
from d2v_scale.config import with_vocab
from d2v_scale.data import synthetic_batch
from d2v_scale.export import write_weights
from d2v_scale.masking import sample_mask
from d2v_scale.presets import get_preset
from d2v_scale.teacher import ema
from d2v_scale.teacher.placement import teacher_traffic
from d2v_scale.train import train_step, with_targets

PLACEMENTS = ("replicated", "host", "device_bf16_host_ema", "device")
STEPS, SAVE_AT, MICRO, GAS = 4, 2, 2, 2


def held_back(delay: float):
    """ema.Blend with its work started `delay` seconds late (in the blend's own thread)."""
    call = ema.Blend.__call__

    def late(self, runs, decay):
        time.sleep(delay)
        return call(self, runs, decay)
    ema.Blend.__call__ = late


def batches(step: int, world: int, rank: int, cfg):
    """The window's micro-batches of this rank and their masks: fixed global batches, rank slices."""
    g = torch.Generator().manual_seed(1000 + step)
    M, B = cfg.mask.clone_batch, MICRO
    out = []
    for _ in range(GAS):
        x = torch.randn(B * world, 3, 32, 32, generator=g)
        mask = sample_mask(cfg.mask, B * world * M, (8, 8), g)
        out.append(({"source": x[rank * B:(rank + 1) * B]}, mask[rank * B * M:(rank + 1) * B * M]))
    return out


def config(placement: str, ds_config: str, world: int):
    cfg = get_preset("vit_base_patch16_debug")
    cfg.teacher.placement, cfg.run.ds_config, cfg.teacher.overlap_ema = placement, ds_config, "true"
    cfg.mask.mask_noise_std, cfg.model.cls_loss = 0.0, 0.0     # nothing per-rank random
    cfg.optim.warmup_steps, cfg.teacher.ema_decay = 1, 0.9      # visible teacher motion
    cfg.data.batch_size, cfg.data.global_batch = MICRO, MICRO * GAS * world
    return cfg


def run(placement: str, ds_config: str, out: Path, dist, window: bool = True, resume_from: Path | None = None):
    cfg = config(placement, ds_config, dist.world)
    built = build_engine(cfg, dist)
    engine, teacher, dtype = built.engine, built.teacher, built.dtype
    start = 0
    if resume_from is not None:
        client, _ = checkpoint.load(engine, teacher, resume_from.parent, resume_from.name, dist.rank)
        teacher.updates, start = client["ema_updates"], engine.global_steps
    probe = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    losses, readers, traffic = [], [], []
    for step in range(start, STEPS):
        window_batches = batches(step, dist.world, dist.rank, cfg)
        items = with_targets([b for b, _ in window_batches], teacher, GAS if window else 1, GAS, dist, dtype)
        for micro, ((batch, targets), (_, mask)) in enumerate(zip(items, window_batches)):
            o, _ = train_step(engine, teacher, batch, cfg, step, micro, dist, dtype, mask=mask, targets=targets)
            t = torch.tensor([float(o["loss"].detach()), float(o["sample_size"])], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            losses.append(t[0].item() / t[1].item())
        with teacher.reading() as enc:                              # the blend of this step may still run
            readers.append(enc.extract_features(probe)[0].clone())
        if teacher.sharded:                                         # the window's pass, the EMA, the reader's pass
            traffic.append(teacher.traffic.reset())
        if engine.global_steps == SAVE_AT and resume_from is None:
            checkpoint.save(engine, teacher, out, SAVE_AT, {"step": SAVE_AT, "ema_updates": teacher.updates}, {},
                            dist.rank)
    final = teacher.full_state() if teacher.sharded else teacher.state_dict()
    numels = [p.numel() for p in teacher.module.parameters()] if not teacher.sharded else \
        [int(torch.tensor(s).prod()) for s in teacher.shapes.values()]
    planned = teacher_traffic(numels, dist.world, 2, False, teacher.placement, 3, master_on_host=False) \
        if teacher.sharded else None
    return {"losses": losses, "final": final, "readers": readers, "traffic": traffic, "planned": planned,
            "placement": getattr(teacher, "placement", "replicated")}


D2V1 = {"image": "d2v1_vit_base_patch16_debug", "audio": "d2v1_audio_base_debug", "text": "d2v1_text_base_debug"}
D2V1_STEPS = 2
D2V1_RESUMES = {"image": ("device_bf16_host_ema", "host"), "audio": ("replicated", "device"),
                "text": ("host", "replicated")}           # placement, the placement whose checkpoint it reads


def d2v1_config(modality: str, placement: str, ds_config: str, world: int):
    cfg = with_vocab(get_preset(D2V1[modality]))
    cfg.teacher.placement, cfg.run.ds_config, cfg.teacher.overlap_ema = placement, ds_config, "true"
    cfg.optim.warmup_steps, cfg.teacher.ema_decay, cfg.teacher.ema_end_decay = 1, 0.9, 0.9   # visible teacher motion
    cfg.data.batch_size, cfg.data.global_batch = MICRO, MICRO * GAS * world
    return cfg


def d2v1_batch(cfg, step: int, micro: int, world: int, rank: int) -> dict:
    """This rank's slice of a fixed global batch (audio: the second utterance of each slice padded)."""
    torch.manual_seed(2000 + 10 * step + micro)
    cfg.data.batch_size = MICRO * world
    batch = synthetic_batch(cfg)
    cfg.data.batch_size = MICRO
    out = {"source": batch["source"][rank * MICRO:(rank + 1) * MICRO]}
    if cfg.model.modality == "audio":
        pad = torch.zeros_like(out["source"], dtype=torch.bool)
        pad[1, -4000:] = True
        out["source"], out["padding_mask"] = out["source"].masked_fill(pad, 0.0), pad
    return out


def run_d2v1(modality: str, placement: str, ds_config: str, out: Path, dist, resume_from: Path | None = None):
    cfg = d2v1_config(modality, placement, ds_config, dist.world)
    built = build_engine(cfg, dist)
    engine, teacher, dtype = built.engine, built.teacher, built.dtype
    if resume_from is not None:
        client, _ = checkpoint.load(engine, teacher, resume_from.parent, resume_from.name, dist.rank)
        teacher.updates = client["ema_updates"]
    losses, traffic = [], []
    for step in range(engine.global_steps, D2V1_STEPS):
        for micro in range(GAS):
            batch = d2v1_batch(cfg, step, micro, dist.world, dist.rank)
            o, _ = train_step(engine, teacher, batch, cfg, step, micro, dist, dtype)
            t = torch.tensor([float(o["loss"].detach()), float(o["sample_size"])], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            losses.append(t[0].item() / t[1].item())
        if teacher.sharded:                                         # a pass per micro-step and the EMA
            teacher.wait()
            traffic.append(teacher.traffic.reset())
        if engine.global_steps == 1 and resume_from is None:
            checkpoint.save(engine, teacher, out, 1, {"step": 1, "ema_updates": teacher.updates}, {}, dist.rank)
    final = teacher.full_state() if teacher.sharded else teacher.state_dict()
    planned = teacher_traffic([int(torch.tensor(s).prod()) for s in teacher.shapes.values()], dist.world, GAS,
                              False, teacher.placement, 3, master_on_host=False) if teacher.sharded else None
    return {"losses": losses, "final": final, "traffic": traffic, "planned": planned,
            "placement": getattr(teacher, "placement", "replicated")}


def main_d2v1(out: Path, ds_config: str, dist) -> None:
    results = {}
    for modality in D2V1:
        for p in PLACEMENTS:
            results[f"{modality}/{p}"] = run_d2v1(modality, p, ds_config, out / "d2v1" / modality / p, dist)
        p, src = D2V1_RESUMES[modality]
        results[f"{modality}/resumed_{p}"] = run_d2v1(modality, p, ds_config, out / "d2v1" / modality / f"resumed_{p}",
                                                      dist, resume_from=out / "d2v1" / modality / src / "checkpoints"
                                                      / "step_00000001")
    if dist.rank == 0:
        torch.save({k: v["final"] for k, v in results.items()}, out / "d2v1_teachers.pt")
        (out / "d2v1_summary.json").write_text(json.dumps(
            {k: {kk: v[kk] for kk in ("losses", "traffic", "planned", "placement")} for k, v in results.items()}))


def main(out: str, ds_config: str, delay: str = "0.3"):
    dist = dist_mod.init()
    held_back(float(delay))
    out = Path(out)
    results = {}
    for p in PLACEMENTS:
        results[p] = run(p, ds_config, out / p, dist)
    results["per_micro_step"] = run("replicated", ds_config, out / "per_micro_step", dist, window=False)
    # resumed from the checkpoint another placement wrote: slices of the same world, slices joined, teacher.pt
    for p, src in (("device_bf16_host_ema", "host"), ("replicated", "device"), ("host", "replicated")):
        results[f"resumed_{p}"] = run(p, ds_config, out / f"resumed_{p}", dist,
                                      resume_from=out / src / "checkpoints" / f"step_{SAVE_AT:08d}")
    # --run.init_from with an encoder-only file: the teacher starts from the loaded student
    cfg = config("device", ds_config, dist.world)
    torch.manual_seed(123)
    weights = {k: torch.randn_like(v) for k, v in Data2Vec(cfg.model).encoder.state_dict().items()}
    if dist.rank == 0:
        write_weights(out / "init.safetensors", weights, cfg.to_dict(), "encoder")
    torch.distributed.barrier()
    cfg.run.init_from = str(out / "init.safetensors")
    teacher = build_engine(cfg, dist).teacher
    loaded = teacher.full_state()
    init_from = all(torch.equal(loaded[n], weights[n]) for n in loaded)
    if dist.rank == 0:
        torch.save({k: {"final": v["final"], "readers": v["readers"]} for k, v in results.items()},
                   out / "teachers.pt")
        summary = {k: {kk: v[kk] for kk in ("losses", "traffic", "planned", "placement")} for k, v in results.items()}
        summary["init_from_teacher_is_the_loaded_student"] = init_from
        (out / "summary.json").write_text(json.dumps(summary))
    main_d2v1(out, ds_config, dist)


if __name__ == "__main__":
    main(*sys.argv[1:])
