"""Checkpoints: the DeepSpeed engine state + the EMA teacher + the data position, written atomically.

This module owns every file under RUN_DIR/checkpoints/:
  step_00001000/           engine.save_checkpoint files, the teacher (teacher.pt: full fp32, or
                           teacher_rank{r}.pt: each rank's fp32 slices; none for a fine-tuning
                           run), data_rank*.json, meta.json
  step_00001000_universal/ the same step converted by `d2v reshard` (loadable at any world size)
  latest                   the newest complete tag (written last; informative: resume scans)
  best                     the tag of a fine-tuning run's best validation (kept when older ones are pruned)
A checkpoint is written to `<tag>.tmp` and renamed only after every rank finished writing, and the
`latest` pointer is replaced after that, so an interrupted save never shadows a good checkpoint.

Resuming scans the `step_*` directories instead of trusting `latest`, takes the newest one whose
every file reads back (meta, engine states, teacher slices, data positions), names the file of
any newer one that does not and falls back past it. Every file is read with torch.load
(weights_only=True), DeepSpeed's own loaders included: a checkpoint cannot run code.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import D2VError, one_line
from .shared_dir import unseen_file

CKPT_DIR = "checkpoints"
_TAG = re.compile(r"^step_(\d+)(_universal)?$")


class CheckpointError(D2VError, ValueError):
    """A checkpoint or run directory that cannot be used as asked; says which file and what to do."""


def _deepspeed_globals() -> list:
    """The non-tensor objects DeepSpeed's checkpoint files legitimately hold (checked against files
    written by ZeRO-0/1/2/3, CPU offload and universal conversion)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads():
    """Every torch.load inside the block reads with weights_only=True, including DeepSpeed's loaders
    that pass weights_only=False themselves (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD), with DeepSpeed's
    own checkpoint types allowed. Forked helper processes (universal conversion) inherit both."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def write_json(path: Path, obj: dict) -> None:
    """A JSON file of the run directory (config.json, ds_config.json, ...), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def save(engine, teacher, run_dir: Path, step: int, client_state: dict, data_state: dict,
         rank: int, keep_last: int = 3, best: str | None = None) -> Path:
    """teacher: None for a fine-tuning run; `best`: a tag pruning keeps (written to `best`)."""
    ckpt_dir = run_dir / CKPT_DIR
    tag = f"step_{step:08d}"
    tmp = ckpt_dir / f"{tag}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)          # leftovers of an interrupted save
    _barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
        if teacher is not None:
            save_teacher(teacher, tmp, rank)
        (tmp / f"data_rank{rank}.json").write_text(json.dumps(data_state))
        if rank == 0:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            stage = engine.zero_optimization_stage()
            (tmp / "meta.json").write_text(json.dumps({"step": step, "world": world, "zero_stage": stage,
                                                       "universal": False, "teacher": teacher is not None}))
    except (OSError, RuntimeError) as e:
        if not disk_full(e, ckpt_dir):
            raise
        shutil.rmtree(tmp, ignore_errors=True)          # no half-written checkpoint stays behind
        raise no_space(ckpt_dir, tmp) from None
    _barrier()
    if unseen := unseen_file(tmp, rank):       # a run directory that is not shared: never made final
        raise CheckpointError(f"checkpoint {tag} is incomplete: {unseen}. The run directory is not shared by "
                              f"every host: put --out on storage they all mount; the newest complete checkpoint "
                              f"is still {latest_tag(ckpt_dir)}")
    final = ckpt_dir / tag
    if rank == 0:
        if final.exists():                  # trained again after resuming from an earlier step: keep it
            aside = _free_name(ckpt_dir / f"{tag}.superseded")
            os.replace(final, aside)
            print(f"checkpoint {tag} existed already: kept as {aside.name}", flush=True)
        os.replace(tmp, final)
        latest = ckpt_dir / "latest.tmp"
        latest.write_text(tag)
        os.replace(latest, ckpt_dir / "latest")
        if best:
            (ckpt_dir / "best.tmp").write_text(best)
            os.replace(ckpt_dir / "best.tmp", ckpt_dir / "best")
        _prune(ckpt_dir, keep_last)
    _barrier()
    return final


def disk_full(e: BaseException, folder: Path) -> bool:
    """A write failed for want of space: ENOSPC/EDQUOT, or torch's stream writer failing on a nearly full
    disk (its RuntimeErrors, "file write failed" then "unexpected pos", carry no errno)."""
    chain = [e]
    while chain[-1].__context__ is not None and len(chain) < 8:
        chain.append(chain[-1].__context__)
    if any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(x) for x in chain):
        return True
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return isinstance(e, RuntimeError) and usage.free < max(64 << 20, usage.total // 100)


def no_space(ckpt_dir: Path, path: Path) -> CheckpointError:
    """The one line of a checkpoint that did not fit (said after its partial files were removed)."""
    usage = shutil.disk_usage(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    return CheckpointError(
        f"no space left on the device writing checkpoint {path} ({usage.free / 2**20:.0f} MiB free of "
        f"{usage.total / 2**20:.0f} MiB after removing it); the last complete checkpoint is "
        f"{ckpt_dir / latest if latest else 'none'}. Free space there (or keep fewer with --run.keep_last), then "
        f"rerun with --resume auto")


def _free_name(path: Path) -> Path:
    n, out = 1, path
    while out.exists():
        n, out = n + 1, path.with_name(f"{path.name}.{n}")
    return out


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name))
    best = (ckpt_dir / "best").read_text().strip() if (ckpt_dir / "best").is_file() else None
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def list_tags(ckpt_dir: Path) -> list[str]:
    """Names of the complete checkpoint directories (`step_N`, `step_N_universal`), newest step first."""
    found = [(int(m[1]), bool(m[2]), p.name) for p in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
             if (m := _TAG.match(p.name)) and p.is_dir()]
    return [name for _, _, name in sorted(found, reverse=True)]


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    f = ckpt_dir / tag / "meta.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _pt_problem(f: Path) -> str | None:
    if f.stat().st_size == 0:
        return f"{f} is empty (0 bytes)"
    try:
        with weights_only_loads():
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - classified into the message
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text:
            what = re.search(r"GLOBAL ([\w.]+)", text)
            return (f"{f} holds Python objects beyond tensors and plain containers"
                    f"{f' ({what[1]})' if what else ''}, which d2v_scale never unpickles")
        return f"{f} cannot be read ({type(e).__name__}: {one_line(text)[:160]}): truncated or damaged"
    return None


def validate(tag_dir: Path) -> str | None:
    """None if every file of the checkpoint reads back; otherwise the first problem, naming the file."""
    meta_f = tag_dir / "meta.json"
    try:
        meta = json.loads(meta_f.read_text())
        world, stage = int(meta["world"]), int(meta["zero_stage"])
    except FileNotFoundError:
        return f"{meta_f} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{meta_f} cannot be read ({type(e).__name__}: {one_line(e)[:120]})"
    needed = []
    if not meta.get("universal"):
        if stage < 3:
            needed.append("mp_rank_00_model_states.pt")
        for r in range(world):
            if stage == 3:
                needed.append(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
            if stage >= 1:
                needed.append(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    if meta.get("teacher", True) and not (tag_dir / "teacher.pt").exists():
        needed += [f"teacher_rank{r}.pt" for r in range(world)]
    needed += [f"data_rank{r}.json" for r in range(world)]
    for name in needed:
        if not any(tag_dir.glob(name)):
            return f"{tag_dir / name} is missing"
    for f in sorted(tag_dir.rglob("*.pt")):
        if problem := _pt_problem(f):
            return problem
    for r in range(world):
        f = tag_dir / f"data_rank{r}.json"
        try:
            state = json.loads(f.read_text())
            if not isinstance(state, dict) or "batches" not in state:
                raise ValueError("no data position")
        except (OSError, ValueError) as e:
            return f"{f} cannot be read ({type(e).__name__}: {one_line(e)[:120]}): truncated or damaged"
    return None


@dataclass
class ResumePoint:
    ckpt_dir: Path
    tag: str
    universal: bool                    # load as a DeepSpeed universal checkpoint (another world size)
    broken: list[tuple[str, str]] = field(default_factory=list)   # newer tags passed over: (tag, problem)

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag


def _order(ckpt_dir: Path, tags: list[str], world: int) -> list[str]:
    """Newest step first; of a step's plain and universal forms, the one that fits this world first."""
    def key(tag: str):
        m = _TAG.match(tag)
        meta = read_meta(ckpt_dir, tag)
        fits = bool(m[2]) != (meta.get("world", world) == world or meta.get("zero_stage", 0) == 0)
        return -int(m[1]), not fits
    return sorted(tags, key=key)


def find_resume(run_dir: Path, resume: str, world: int) -> ResumePoint | None:
    """The checkpoint to resume from (None: start from scratch), for `--resume ""|auto|PATH`.

    Without --resume a run directory that holds checkpoints is refused (it would start over on top of
    them). `auto` takes the newest checkpoint that reads back, passing over (and naming) newer broken
    ones; PATH is a checkpoints/ directory (same as auto there) or one step_* directory."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if not resume:
        tags = list_tags(ckpt_dir)
        if tags:
            raise CheckpointError(f"{run_dir} already holds checkpoints (newest {tags[0]}): pass --resume auto to "
                                  "continue that run, or a new --out to start another")
        return None
    if resume != "auto":
        path = Path(resume)
        if _TAG.match(path.name) and path.is_dir():
            ckpt_dir, tags = path.parent, [path.name]
        elif path.is_dir() and list_tags(path):
            ckpt_dir, tags = path, list_tags(path)
        else:
            raise CheckpointError(f"--resume {resume}: no checkpoint there (expected a run's checkpoints/ directory "
                                  "or one of its step_* directories)")
    else:
        tags = list_tags(ckpt_dir)
    broken = []
    for tag in _order(ckpt_dir, tags, world):
        if problem := validate(ckpt_dir / tag):
            broken.append((tag, problem))
            continue
        meta = read_meta(ckpt_dir, tag)
        if not meta.get("universal") and meta["world"] != world and meta["zero_stage"] > 0:
            raise CheckpointError(
                f"checkpoint {ckpt_dir / tag} was written by {meta['world']} ranks and this run has {world}: ZeRO "
                f"partitions the optimizer state by rank. Convert it once with `d2v reshard {ckpt_dir.parent}` "
                f"(a DeepSpeed universal checkpoint), then resume again")
        return ResumePoint(ckpt_dir, tag, bool(meta.get("universal")), broken)
    if broken:
        listed = "; ".join(f"{tag}: {problem}" for tag, problem in broken)
        raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: {listed}. Restore the named files, or move "
                              f"{ckpt_dir} away to start the run over")
    return None


def set_aside(point: ResumePoint) -> list[str]:
    """Rename the broken checkpoints passed over to `<tag>.broken` (kept, never scanned again)."""
    moved = []
    for tag, _ in point.broken:
        src = point.ckpt_dir / tag
        if src.is_dir():
            dst = _free_name(point.ckpt_dir / f"{tag}.broken")
            os.replace(src, dst)
            moved.append(dst.name)
    return moved


def open_run(run_dir: Path, cfg: dict, ds: dict, resumed: ResumePoint | None) -> list[str]:
    """Rank 0, once the pre-flight passed: the run directory with this run's config.json and
    ds_config.json, and the broken checkpoints a resume passed over set aside. Returns what to say."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg)
    write_json(run_dir / "ds_config.json", ds)
    said = [f"checkpoint {tag} is unusable: {problem}" for tag, problem in (resumed.broken if resumed else [])]
    return said + [f"passed over it; kept as {name}" for name in (set_aside(resumed) if resumed else [])]


# -- the teacher's files ------------------------------------------------------------------------

def save_teacher(teacher, tag_dir: Path, rank: int) -> None:
    """A sharded teacher: every rank its slices; a replicated one: rank 0 the full fp32 state."""
    if teacher.sharded:
        torch.save(teacher.state_dict(), Path(tag_dir) / f"teacher_rank{rank}.pt")
    elif rank == 0:
        torch.save(teacher.state_dict(), Path(tag_dir) / "teacher.pt")


def load_teacher(teacher, tag_dir: Path, rank: int) -> None:
    """Restore either teacher from either layout: a sharded teacher of the same world size takes its
    own slices; everything else goes through the full state (slices re-split by the teacher)."""
    tag_dir = Path(tag_dir)
    own = tag_dir / f"teacher_rank{rank}.pt"
    if teacher.sharded and own.exists() and len(_slice_files(tag_dir)) == teacher.world:
        teacher.load_slices(torch.load(own, map_location="cpu", weights_only=True)["slices"])
    else:
        teacher.load_state_dict(read_teacher_state(tag_dir))


def read_teacher_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 teacher of a checkpoint, on CPU: teacher.pt, or the per-rank slices joined."""
    tag_dir = Path(tag_dir)
    if (tag_dir / "teacher.pt").exists():
        return torch.load(tag_dir / "teacher.pt", map_location="cpu", weights_only=True)
    files = _slice_files(tag_dir)
    if not files:
        raise CheckpointError(f"{tag_dir}: no teacher.pt or teacher_rank*.pt; the checkpoint is incomplete")
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    world = shards[0]["world"]
    if len(shards) != world:
        raise CheckpointError(f"{tag_dir}: {len(shards)} teacher slices for a world of {world}; the checkpoint is incomplete")
    return {n: torch.cat([s["slices"][n] for s in shards])[: math.prod(shape)].view(shape)
            for n, shape in shards[0]["shapes"].items()}


def _slice_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("teacher_rank*.pt"), key=lambda f: int(f.stem.split("rank")[1]))


# -- world-size changes and export -------------------------------------------------------------

def make_universal(run_dir: Path, tag: str | None = None, workers: int = 2) -> Path:
    """Convert a checkpoint to DeepSpeed's universal format (loadable at any world size) beside it,
    carry over the teacher, data position and metadata, and point `latest` at it."""
    from deepspeed.checkpoint import ds_to_universal
    ckpt_dir = Path(run_dir) / CKPT_DIR
    tag = pick_tag(ckpt_dir, tag)
    if tag.endswith("_universal"):
        return ckpt_dir / tag
    src, out = ckpt_dir / tag, ckpt_dir / f"{tag}_universal"
    tmp = ckpt_dir / f"{tag}_universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with weights_only_loads():
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
    """Restore engine (weights, optimizer, step) and teacher (None: a run without one); returns
    (client_state, data_state)."""
    with weights_only_loads():
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    if client_state is None:
        raise CheckpointError(f"could not load checkpoint {ckpt_dir / tag}; check it with `d2v export` or move it away")
    if teacher is not None:
        load_teacher(teacher, ckpt_dir / tag, rank)
    data_file = ckpt_dir / tag / f"data_rank{rank}.json"
    if not data_file.exists():               # resumed at another world size: rank 0's epoch position
        data_file = ckpt_dir / tag / "data_rank0.json"
    data_state = json.loads(data_file.read_text()) if data_file.exists() else {}
    return client_state, data_state


@contextmanager
def _silenced(quiet: bool):
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):
        yield


def pick_tag(ckpt_dir: Path, tag: str | None = None) -> str:
    """`tag` (checked), or the newest checkpoint; the message names the broken file or the tags there are."""
    tags = list_tags(ckpt_dir)
    if tag is None:
        if not tags:
            raise CheckpointError(f"{ckpt_dir.parent}: no checkpoint in {ckpt_dir}; train first or point at a run directory")
        tag = tags[0]
    elif tag not in tags:
        have = ", ".join(reversed(tags)) or "none"
        raise CheckpointError(f"--tag {tag}: no such checkpoint in {ckpt_dir} (there: {have})")
    if problem := validate(ckpt_dir / tag):
        raise CheckpointError(f"checkpoint {tag} is unusable: {problem}; pick another with --tag")
    return tag


def consolidated_state(run_dir: Path, tag: str | None = None, quiet: bool = False) -> tuple[dict, str]:
    """fp32 student state_dict of a run's checkpoint (any ZeRO stage), offline, on CPU; `quiet`: without
    DeepSpeed's report of the files it reads (a run that exports while training)."""
    ckpt_dir = Path(run_dir) / CKPT_DIR if (Path(run_dir) / CKPT_DIR).is_dir() else Path(run_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CKPT_DIR}/ in it)")
    tag = pick_tag(ckpt_dir, tag)
    tag_dir = ckpt_dir / tag
    with weights_only_loads(), _silenced(quiet):
        if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:  # ZeRO-0: the engine saved the module itself
            files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {k: v.float() for k, v in state.items()}, tag
