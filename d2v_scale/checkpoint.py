"""Checkpoints: the DeepSpeed engine state + the EMA teacher + the data position, written atomically.

Layout under RUN_DIR/checkpoints/:
  step_00001000/           engine.save_checkpoint files, teacher*.pt, data_rank*.json, config.json
  latest                   the newest complete tag (written last)
A checkpoint is written to `<tag>.tmp` and renamed only after every rank finished writing, and the
`latest` pointer is replaced after that, so an interrupted save never shadows a good checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def save(engine, teacher, run_dir: Path, step: int, client_state: dict, data_state: dict,
         rank: int, keep_last: int = 3) -> Path:
    ckpt_dir = run_dir / CKPT_DIR
    tag = f"step_{step:08d}"
    tmp = ckpt_dir / f"{tag}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)          # leftovers of an interrupted save
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    teacher.save(tmp, rank)
    (tmp / f"data_rank{rank}.json").write_text(json.dumps(data_state))
    if rank == 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        stage = engine.zero_optimization_stage()
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world": world, "zero_stage": stage,
                                                   "universal": False}))
    _barrier()
    final = ckpt_dir / tag
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest = ckpt_dir / "latest.tmp"
        latest.write_text(tag)
        os.replace(latest, ckpt_dir / "latest")
        _prune(ckpt_dir, keep_last)
    _barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", "_universal")))
    for old in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str) -> tuple[Path, str] | None:
    """(checkpoint dir, tag) to resume from: `auto` = newest under run_dir (None if there is none)."""
    if not resume:
        return None
    if resume == "auto":
        ckpt_dir = run_dir / CKPT_DIR
        tag = latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if (path / "latest").exists():
        tag = latest_tag(path)
        if tag:
            return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a run's checkpoints/ dir "
                            "with a `latest` file, or a step_* directory)")


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    f = ckpt_dir / tag / "meta.json"
    return json.loads(f.read_text()) if f.exists() else {}


def check_world(ckpt_dir: Path, tag: str, world: int) -> bool:
    """True when the checkpoint must be loaded as a DeepSpeed universal checkpoint; raises with the
    fix when it was written by another number of ranks and has not been converted."""
    meta = read_meta(ckpt_dir, tag)
    if meta.get("universal"):
        return True
    saved = meta.get("world", world)
    if saved != world and meta.get("zero_stage", 0) > 0:
        raise ValueError(
            f"checkpoint {ckpt_dir / tag} was written by {saved} ranks and this run has {world}: ZeRO "
            f"partitions the optimizer state by rank. Convert it once with `d2v reshard {ckpt_dir.parent}` "
            f"(a DeepSpeed universal checkpoint), then resume again")
    return False


def make_universal(run_dir: Path, tag: str | None = None, workers: int = 2) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (loadable at any world size) beside it,
    carry over the teacher, data position and metadata, and point `latest` at it."""
    import argparse
    from deepspeed.checkpoint import ds_to_universal
    ckpt_dir = Path(run_dir) / CKPT_DIR
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to convert")
    if tag.endswith("_universal"):
        return ckpt_dir / tag
    src, out = ckpt_dir / tag, ckpt_dir / f"{tag}_universal"
    tmp = ckpt_dir / f"{tag}_universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    for f in list(src.glob("teacher*.pt")) + list(src.glob("data_rank*.json")):
        shutil.copy2(f, tmp / f.name)
    meta = read_meta(ckpt_dir, tag)
    (tmp / "meta.json").write_text(json.dumps({**meta, "universal": True, "converted_from": tag}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    (ckpt_dir / "latest.tmp").write_text(out.name)
    os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
    return out


def load(engine, teacher, ckpt_dir: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """Restore engine (weights, optimizer, step) and teacher; returns (client_state, data_state)."""
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"could not load checkpoint {ckpt_dir / tag}")
    teacher.load(ckpt_dir / tag, rank)
    data_file = ckpt_dir / tag / f"data_rank{rank}.json"
    if not data_file.exists():               # resumed at another world size: rank 0's epoch position
        data_file = ckpt_dir / tag / "data_rank0.json"
    data_state = json.loads(data_file.read_text()) if data_file.exists() else {}
    return client_state, data_state


def consolidated_state(run_dir: Path, tag: str | None = None) -> tuple[dict, str]:
    """fp32 student state_dict of a run's checkpoint (any ZeRO stage), offline, on CPU."""
    ckpt_dir = Path(run_dir) / CKPT_DIR if (Path(run_dir) / CKPT_DIR).is_dir() else Path(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint found (looked for {ckpt_dir}/latest)")
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # ZeRO-0: the engine saved the module itself
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}, tag
