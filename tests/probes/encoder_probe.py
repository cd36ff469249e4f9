"""Run by tests/test_eval.py under the deepspeed launcher (2 CPU ranks, ZeRO-3, sharded teacher).

Trains 3 steps of vit_base_patch16_debug on fixed synthetic batches, checkpoints into RUN_DIR like
`d2v train` (config.json + checkpoints/), then records (rank 0) the features the live engines give on
a fixed batch: the student's (ZeRO-3-partitioned) encoder and the sharded teacher's. Between steps 2
and 3 it runs the kNN monitor on SHARDS on both ranks and records what the monitor left behind: the
RNG state, the student's parameters and the modules' train/eval modes (all must be unchanged) and the
values each rank computed (must agree).
"""
import json
import sys
from pathlib import Path

import torch

from d2v_scale import checkpoint
from d2v_scale import dist as dist_mod
from d2v_scale.engine import build_engine
from d2v_scale.evaluate import KnnMonitor, eval_shards
from d2v_scale.presets import get_preset
from d2v_scale.train import train_step


def main(run_dir: str, shards: str, out: str):
    cfg = get_preset("vit_base_patch16_debug")
    cfg.run.ds_config, cfg.run.out = "ds_configs/zero3.json", run_dir
    cfg.data.batch_size, cfg.optim.warmup_steps, cfg.teacher.ema_decay = 4, 1, 0.9   # the teacher moves visibly
    cfg.eval.every, cfg.eval.data, cfg.eval.batch_size = 1, shards, 16
    dist = dist_mod.init()
    built = build_engine(cfg, dist)
    engine, teacher, dtype = built.engine, built.teacher, built.dtype
    assert teacher.sharded
    monitor = KnnMonitor(cfg, dist, eval_shards(shards, "image", "--eval.data"))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(cfg.data.batch_size, 3, 32, 32, generator=gen) for _ in range(3)]
    enc = engine.module.encoder
    record = {}
    for step, x in enumerate(batches):
        if step == 2:
            params = {n: float(p.ds_tensor.double().sum()) for n, p in enc.named_parameters()}
            modes = [m.training for m in engine.module.modules()] + [m.training for m in teacher.encoder.modules()]
            rng = torch.get_rng_state()
            values = monitor(enc, teacher, dtype)
            record["rng_kept"] = bool(torch.equal(rng, torch.get_rng_state()))
            record["params_kept"] = params == {n: float(p.ds_tensor.double().sum()) for n, p in enc.named_parameters()}
            record["modes_kept"] = modes == ([m.training for m in engine.module.modules()]
                                             + [m.training for m in teacher.encoder.modules()])
            gathered = [None] * dist.world
            torch.distributed.all_gather_object(gathered, values)
            record["monitor"] = gathered
        train_step(engine, teacher, {"source": x}, cfg, step, 0, dist, dtype)
    if dist.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(Path(run_dir) / "config.json", cfg.to_dict())
    checkpoint.save(engine, teacher, Path(run_dir), engine.global_steps, {"step": engine.global_steps}, {"batches": 3},
                    dist.rank)

    probe = torch.randn(3, 3, 32, 32, generator=gen)
    engine.eval()
    with torch.no_grad():
        student, _ = enc.extract_features(probe)                          # ZeRO-3: gathered per module
        with teacher.reading() as t_enc:                                  # gathered block by block
            teacher_x, _ = t_enc.extract_features(probe)
    if dist.is_main:
        torch.save({"probe": probe, "student": student, "teacher": teacher_x}, out)
        Path(out).with_suffix(".json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:4])
