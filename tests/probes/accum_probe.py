"""Which dtype DeepSpeed accumulates gradients in, for a ds_config with bf16 forced on (CPU ranks run
bf16 too): builds the engine for `vit_base_patch16_debug` at accumulation 2, runs one optimizer step
and prints one JSON line: DeepSpeed's (model, accumulation) dtypes, the optimizer class, and the dtype
and element count of the buffers that hold the gradients summed across micro-steps.

  python tests/probes/accum_probe.py DS_CONFIG [DS_CONFIG ...]     (one line per config)
"""
import json
import sys

import torch

from d2v_scale import dist as dist_mod
from d2v_scale.config import with_vocab
from d2v_scale.data import synthetic_batch
from d2v_scale.engine import build_engine
from d2v_scale.presets import build_config
from d2v_scale.train import train_step


def accumulators(engine) -> list[torch.Tensor]:
    """The tensors a ZeRO stage sums micro-step gradients into (after the first micro-step)."""
    opt = engine.optimizer
    if getattr(opt, "fp32_groups_gradients_flat", None):                 # BF16_Optimizer (ZeRO-1)
        return list(opt.fp32_groups_gradients_flat)
    if getattr(opt, "grad_partitions_flat_buffer", None) is not None:    # ZeRO-3
        return [opt.grad_partitions_flat_buffer]
    if getattr(opt, "averaged_gradients", None):                         # ZeRO-2 compact fp32 partition
        return [getattr(g, "flat_partition", None) if getattr(g, "flat_partition", None) is not None else g[0]
                for g in opt.averaged_gradients.values()]
    if getattr(opt, "grads_in_partition", None) is not None:             # ZeRO-2 16-bit partition
        return [opt.grads_in_partition]
    params = list(engine.module.parameters())                            # ZeRO-1/2 in 16 bits: .grad
    held = [getattr(p, "grad_accum", None) for p in params]
    return [t for t in held if t is not None] or [p.grad for p in params if p.grad is not None]


def probe(ds_config: str, dist) -> None:
    cfg, ds_over = build_config("vit_base_patch16_debug", None, ds_config=ds_config, **{"data.batch_size": 2})
    cfg.data.global_batch = 4                               # 2 micro-steps per optimizer step
    with_vocab(cfg)
    built = build_engine(cfg, dist, ds_overrides={"bf16.enabled": True, **ds_over})
    engine = built.engine
    batch = synthetic_batch(cfg)
    train_step(engine, built.teacher, batch, cfg, 0, 0, dist, built.dtype)      # first micro-step: sums start
    held = accumulators(engine)
    train_step(engine, built.teacher, batch, cfg, 0, 1, dist, built.dtype)      # boundary: step applied
    model, accum = engine.get_data_types()
    print(json.dumps({"model_dtype": str(model), "accum_dtype": str(accum),
                      "optimizer": type(engine.optimizer).__name__, "steps": engine.global_steps,
                      "buffers": sorted({str(t.dtype) for t in held}), "numel": sum(t.numel() for t in held),
                      "params": built.n_params}), flush=True)


if __name__ == "__main__":
    dist = dist_mod.init()
    for path in sys.argv[1:]:
        probe(path, dist)
