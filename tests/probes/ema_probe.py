"""Run by tests/test_teacher_scale.py under the deepspeed launcher (1 or 2 CPU ranks).

Trains k steps of vit_base_patch16_debug on fixed synthetic global batches and fixed global masks
(each rank takes its slice), records the gathered fp32 student after every optimizer step, keeps the
closed-form EMA of those students beside the run, and writes (rank 0) losses, the gathered teacher,
the exactness check and the number of collectives the EMA updates issued.
"""
import json
import sys

import torch

from d2v_scale import dist as dist_mod
from d2v_scale.engine import build_engine
from d2v_scale.masking import sample_mask
from d2v_scale.presets import get_preset
from d2v_scale.teacher import decay_at
from d2v_scale.train import train_step


def main(prefix: str, placement: str, ds_config: str, overlap: str = "auto", steps: int = 6, global_batch: int = 8):
    cfg = get_preset("vit_base_patch16_debug")
    cfg.teacher.placement, cfg.run.ds_config, cfg.teacher.overlap_ema = placement, ds_config, overlap
    cfg.mask.mask_noise_std = 0.0                          # no per-rank random noise: runs comparable across world sizes
    cfg.model.cls_loss = 0.0                               # fairseq weights the CLS term by the per-rank token count
    cfg.optim.warmup_steps, cfg.teacher.ema_decay = 1, 0.9  # visible teacher motion
    dist = dist_mod.init()
    cfg.data.batch_size = global_batch // dist.world
    built = build_engine(cfg, dist)
    engine, teacher, dtype, ds = built.engine, built.teacher, built.dtype, built.ds
    M, B = cfg.mask.clone_batch, cfg.data.batch_size
    import deepspeed
    stage3 = ds["zero_optimization"]["stage"] == 3
    params = dict(engine.module.encoder.named_parameters())

    def student_fp32():                                   # collective gather, outside the EMA
        if stage3:
            return {n: deepspeed.utils.safe_get_full_fp32_param(params[n]).cpu().clone() for n in names}
        return {n: params[n].detach().float().cpu().clone() for n in names}

    if placement == "sharded":
        names = teacher.names
        teacher_full = teacher.full_state
    else:
        names = teacher.names
        teacher_full = teacher.state_dict
    closed = {n: v.clone() for n, v in teacher_full().items()}
    losses, counted = [], {"calls": 0, "bytes": 0}
    update = teacher.update

    def counted_update(encoder, decay):                   # the EMA step, with its collectives counted
        with dist_mod.count_collectives() as c:
            update(encoder, decay)
        counted["calls"] += c.calls
        counted["bytes"] += c.bytes

    teacher.update = counted_update
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(global_batch, 3, 32, 32, generator=g)
        mask = sample_mask(cfg.mask, global_batch * M, (8, 8), g)
        sl, ml = slice(dist.rank * B, (dist.rank + 1) * B), slice(dist.rank * B * M, (dist.rank + 1) * B * M)
        out, _ = train_step(engine, teacher, {"source": x[sl]}, cfg, step, 0, dist, dtype, mask=mask[ml])
        tau = decay_at(engine.global_steps, cfg.teacher)
        s = student_fp32()
        for n in names:
            closed[n].mul_(tau).add_(s[n], alpha=1 - tau)
        loss = torch.tensor([float(out["loss"].detach()), float(out["sample_size"])], dtype=torch.float64)
        if dist.world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(loss[0].item() / loss[1].item())
    final = teacher_full()
    exact = all(torch.equal(final[n], closed[n]) for n in names)
    maxdiff = max(float((final[n] - closed[n]).abs().max()) for n in names)
    if dist.rank == 0:
        torch.save(final, prefix + ".teacher.pt")
        json.dump({"losses": losses, "exact": exact, "maxdiff": maxdiff, "ema_collectives": counted["calls"],
                   "ema_collective_bytes": counted["bytes"], "world": dist.world, "placement": placement,
                   "teacher_device": str(teacher.low[0].device)
                   if placement == "sharded" else "n/a"}, open(prefix + ".json", "w"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
