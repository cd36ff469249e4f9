"""Micro-steps of the real training step (DeepSpeed engine, masks drawn ahead as the loader's workers
draw them) under `HostSyncCheck` in record mode; one JSON line per preset: the host waits it saw, split
into those inside the student's forward + loss + the step's own code (`step`) and those inside
DeepSpeed's backward / optimizer step (`deepspeed`).

  python tests/probes/sync_probe.py DS_CONFIG PRESET[:padded] [PRESET[:padded] ...]

`:padded` feeds batches with padding, as the loaders make them: audio padded to its longest utterance
(`data.pad_audio`: rows from half the longest up to it), text with `<pad>` tails (the last row full).
"""
import dataclasses
import json
import sys

import torch

from d2v_scale import dist as dist_mod
from d2v_scale.config import with_vocab
from d2v_scale.data import AudioCodec, synthetic_batch
from d2v_scale.engine import build_engine
from d2v_scale.masking import AheadMasks
from d2v_scale.metrics import Metrics
from d2v_scale.presets import build_config
from d2v_scale.tools.host_sync import HostSyncCheck
from d2v_scale.train import train_step


class _Split:
    """Records which engine phase is running, so each hit is attributed to it."""

    def __init__(self, engine, check):
        self.phase = "step"
        for attr in ("backward", "step"):
            fn = getattr(engine, attr)
            setattr(engine, attr, self._in(fn, check))

    def _in(self, fn, check):
        def call(*a, **kw):
            n = len(check.hits)
            out = fn(*a, **kw)
            moved = check.hits[n:]
            del check.hits[n:]
            check.deepspeed.extend(moved)
            return out
        return call


def padded_batch(cfg, k: int) -> dict:
    """A batch of `data.batch_size` rows with padding, as the loader's collate makes it (host tensors)."""
    torch.manual_seed(k)
    if cfg.model.modality == "audio":
        n = cfg.data.max_sample_size
        codec = AudioCodec(dataclasses.replace(cfg.data, pad_audio=True))
        return codec.collate([torch.randn(n * (2 + i) // 4) for i in range(cfg.data.batch_size - 1)] + [torch.randn(n)])
    batch = synthetic_batch(cfg)
    T = batch["source"].shape[1]
    for i in range(cfg.data.batch_size - 1):                    # the last row keeps every token
        batch["source"][i, T * (2 + i) // 4:] = cfg.model.text.pad_idx
    return batch


def probe(ds_config: str, name: str, dist) -> dict:
    preset, _, variant = name.partition(":")
    cfg, ds_over = build_config(preset, None, ds_config=ds_config, **{"data.batch_size": 2})
    cfg.data.global_batch = 4                                   # 2 micro-steps: a non-boundary one too
    cfg.optim.warmup_steps = 0
    with_vocab(cfg)
    built = build_engine(cfg, dist, ds_overrides=ds_over)
    masks = AheadMasks(cfg, dist.rank, 2)
    make = padded_batch if variant == "padded" else (lambda cfg, k: synthetic_batch(cfg))
    batches = [masks(dict(make(cfg, k)), k) for k in range(4)]
    padded = [built.engine.module.encoder.has_padding(b["source"], b.get("padding_mask")) for b in batches]
    assert all(padded) == (variant == "padded"), padded           # the padded batches do pad tokens
    train_step(built.engine, built.teacher, batches[0], cfg, 0, 0, dist, built.dtype)   # warm-up micro-steps
    train_step(built.engine, built.teacher, batches[1], cfg, 0, 1, dist, built.dtype)
    host = [t for b in batches[2:] for t in b.values() if hasattr(t, "untyped_storage")]
    check = HostSyncCheck(dist.device, host=host, record=True)
    check.deepspeed = []
    _Split(built.engine, check)
    metrics = Metrics(None, False, dist.world, 0, 10, 0.0, progress=False)    # not rank 0: writes nothing
    with check:
        for micro in range(2):
            b = batches[2 + micro]
            out, _ = train_step(built.engine, built.teacher, b, cfg, 1, micro, dist, built.dtype)
            metrics.update(out, b["source"].shape[0], 1.0)
    built.teacher.wait() if hasattr(built.teacher, "wait") else None
    return {"preset": name, "ds_config": ds_config, "step": sorted(set(check.hits)),
            "deepspeed": sorted(set(check.deepspeed)), "global_steps": built.engine.global_steps}


if __name__ == "__main__":
    dist = dist_mod.init()
    for name in sys.argv[2:]:
        print(json.dumps(probe(sys.argv[1], name, dist)), flush=True)
