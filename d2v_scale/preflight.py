"""Everything a run checks before any rank starts work, and the settings it resolves on the way.

The config's values, the DeepSpeed config (DeepSpeed's own validation, and keys DeepSpeed would
silently ignore), the shards (schemes, existence, tar headers, the index's modality, the first
sample's), the masks on the token grid, the `--run.init_from` weights (names and shapes against the
model), the run directory (a writable directory; checkpoints there need `--resume`), the
checkpoint to resume from (newest that reads back) and the model it was trained with; the labelled
shards of the kNN monitor (the same class names in `--eval.val`); for fine-tuning
(`finetune_preflight`) the --init weights, their modality and head, and the labels of the training
and validation shards (the same class names). `d2v check` runs this in
one process before any launcher starts ranks; `d2v train` and `d2v finetune` run it on every rank
before the ranks wait on each other. Nothing here writes to the run directory.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import ResumePoint, find_resume
from .config import Config, ConfigError, from_json
from .student import build_model
from .data import DataError, Shards, check_first_sample, check_shards, find_shards
from .dsconfig import resolve_ds_config, validate_ds_config
from .engine import check_compile
from .errors import one_line
from .evaluate import EvalShards, check_same_classes, eval_shards
from .export import read_weight_shapes
from .masking import check_masks
from .models import token_grid
from .presets import FINETUNE_PRESETS
from .pretrained import EncoderWeights, read_encoder
from .runlock import check_free
from .tasks import TASKS, Task, get_task


@dataclass
class Preflight:
    shards: Shards
    ds: dict                                        # the resolved DeepSpeed config
    resume: ResumePoint | None                      # None: start from scratch
    changed: list[str] = field(default_factory=list)   # settings that differ from the resumed run's
    eval_bank: EvalShards | None = None             # the kNN monitor's labelled shards (eval.data)
    eval_queries: EvalShards | None = None          # eval.val (None: leave-one-out over the bank)


def preflight(cfg: Config, ds_overrides: dict | None, world: int, every_shard: bool = True) -> Preflight:
    """Raise ConfigError / DataError / MaskError / CheckpointError with the fix, or return what the run
    will use. `every_shard`: read the tar header of every local shard (else the first only)."""
    cfg.validate()
    if cfg.finetune.task:
        raise ConfigError(f"--preset {cfg.preset} is a fine-tuning recipe: run `d2v finetune --preset {cfg.preset} "
                          "--init WEIGHTS --train SHARDS --val SHARDS ...`, or pretrain with a pretraining preset")
    shards = check_data(cfg, cfg.data.path, world, every_shard)
    resolve_from_data(cfg, shards)
    check_masks(cfg, token_grid(cfg, cfg.data.min_sample_size))
    check_init_from(cfg)
    bank = queries = None
    if cfg.eval.data:
        bank = eval_shards(cfg.eval.data, cfg.model.modality, "--eval.data", cfg.data.allow_pipe)
        if cfg.eval.val:
            queries = eval_shards(cfg.eval.val, cfg.model.modality, "--eval.val", cfg.data.allow_pipe)
            check_same_classes(bank, queries)
    ds, resume, changed = check_run(cfg, ds_overrides, world)
    return Preflight(shards, ds, resume, changed, bank, queries)


def check_data(cfg: Config, path: str, world: int, every_shard: bool = True, source: str = "--data") -> Shards:
    """The training shards: they exist, are tar archives of the model's modality, and split over the ranks."""
    shards = find_shards(path, cfg.data.allow_pipe)
    check_shards(shards, cfg.model.modality, path, every_local=every_shard)
    check_first_sample(shards, cfg.model.modality, f"{source} {path}")
    W = max(1, cfg.data.num_workers)
    if cfg.data.sampling == "split" and len(shards.urls) < world * W:
        raise DataError(f"{source}: {len(shards.urls)} shards cannot be split over {world} ranks x {W} workers: make "
                        "more shards (d2v-shard --maxcount), use fewer --data.num_workers, or --data.sampling=resample")
    return shards


def check_run(cfg: Config, ds_overrides: dict | None, world: int) -> tuple[dict, ResumePoint | None, list[str]]:
    """The ds_config (resolved and validated), --out, the checkpoint to resume from and what changed."""
    ds = resolve_ds_config(cfg, world, ds_overrides)
    validate_ds_config(ds, cfg.run.ds_config)
    if cfg.run.compile:
        check_compile(ds)
    run_dir = Path(cfg.run.out)
    check_out_dir(run_dir)
    check_free(run_dir)                             # another run holds --out: say so before anything else
    resume = find_resume(run_dir, cfg.run.resume, world)
    changed = check_same_model(cfg, resume)
    if resume is not None and resume.universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds, resume, changed


# -- fine-tuning ----------------------------------------------------------------------------------

@dataclass
class FinetunePlan:
    shards: Shards                                  # training shards
    val: EvalShards                                 # validation shards
    task: Task                                      # prepared: it knows its data (classes, dictionary)
    weights: EncoderWeights                         # the --init encoder (and head)
    ds: dict
    resume: ResumePoint | None
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things worth saying (a recipe for another size)


def finetune_preflight(cfg: Config, ds_overrides: dict | None, world: int, every_shard: bool = True) -> FinetunePlan:
    """`d2v finetune`'s checks; sets cfg.model to the --init encoder's. Raises with the fix."""
    f = cfg.finetune
    if not f.task:
        raise ConfigError(f"d2v finetune needs --task ({', '.join(TASKS)}) or a fine-tuning --preset, e.g. "
                          "vit_base_patch16_ft")
    task = get_task(cfg)
    if not f.init:
        raise ConfigError("d2v finetune needs --init WEIGHTS: a weights file (d2v export / d2v import-fairseq), a "
                          "pretraining run directory or a fairseq checkpoint")
    if not cfg.data.path or not f.val:
        raise ConfigError("d2v finetune needs --train SHARDS and --val SHARDS")
    if cfg.preset and cfg.preset not in FINETUNE_PRESETS.values():
        raise ConfigError(f"--preset {cfg.preset} is a pretraining preset; fine-tuning presets: "
                          f"{', '.join(sorted(set(FINETUNE_PRESETS.values())))} (or leave --preset out: it follows --init)")
    weights = read_encoder(f.init, f.init_teacher)
    notes = []
    if weights.cfg.model.modality != task.modality:
        raise ConfigError(f"--init {f.init} holds {weights.cfg.model.modality} weights; --task {f.task} fine-tunes "
                          f"{task.modality} encoders: pick the task of that modality or other --init weights")
    if (weights.cfg.model.embed_dim, weights.cfg.model.depth) != (cfg.model.embed_dim, cfg.model.depth):
        notes.append(f"--init holds a {weights.cfg.model.embed_dim}-wide, {weights.cfg.model.depth}+"
                     f"{weights.cfg.model.prenet_depth}-block encoder; preset {cfg.preset} publishes the recipe for "
                     f"{cfg.model.embed_dim}-wide models")
    cfg.model = weights.cfg.model
    cfg.validate()
    shards = check_data(cfg, cfg.data.path, world, every_shard, "--train")
    val = task.prepare(weights, world)
    ds, resume, changed = check_run(cfg, ds_overrides, world)
    return FinetunePlan(shards, val, task, weights, ds, resume, changed, notes)


# -- data-derived settings ----------------------------------------------------------------

def resolve_from_data(cfg: Config, shards: Shards) -> None:
    """Settings that come from the shards: the text vocabulary size (the index records it)."""
    m = cfg.model
    if m.modality != "text" or m.text.vocab_size > 0:
        return
    vocab = shards.index.get("vocab_size", 0)
    if vocab:   # data2vec 1: + the <mask> id, added last as fairseq's masked_lm task adds it
        m.text.vocab_size = int(vocab) + (1 if m.algorithm == "data2vec" else 0)
        return
    raise ConfigError("model.text.vocab_size is unknown: pass --data INDEX.json written by `d2v-shard text` "
                      "(it records the sentencepiece vocabulary) or set --model.text.vocab_size")


def check_init_from(cfg: Config) -> None:
    """--run.init_from: a d2v_scale weights file whose tensors (names and shapes, read from its header)
    fit the model this config builds, student and teacher, as `engine.load_init_weights` will load them."""
    path = cfg.run.init_from
    if not path:
        return
    student, teacher = read_weight_shapes(path)
    with torch.device("meta"):                                  # shapes only: no memory, no init
        model = build_model(cfg)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    enc = model.encoder                                         # the teacher holds no local modules it never runs
    skip = () if enc.ema_local_encoder else tuple(enc.local_modules)
    encoder = {k[len("encoder."):]: v for k, v in want.items()
               if k.startswith("encoder.") and k.split(".")[1] not in skip}
    unexpected = sorted(set(student) - set(want))
    missing = sorted(k for k in want if k.startswith("encoder.") and k not in student)
    shapes = [f"{k} {student[k]} (model {want[k]})" for k in sorted(set(student) & set(want)) if student[k] != want[k]]
    if teacher:
        unexpected += sorted(f"teacher.{k}" for k in set(teacher) - set(encoder))
        missing += sorted(f"teacher.{k}" for k in set(encoder) - set(teacher))
        shapes += [f"teacher.{k} {teacher[k]} (model {encoder[k]})" for k in sorted(set(teacher) & set(encoder))
                   if teacher[k] != encoder[k]]
    if unexpected or missing or shapes:
        found = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                          (("shapes differ", shapes), ("missing", missing), ("unexpected", unexpected)) if keys)
        raise ConfigError(f"--run.init_from {path} does not fit the model of this config ({found}); give the weights "
                          "of the same --preset (d2v export of its run, or d2v import-fairseq of its checkpoint)")


# -- the run directory --------------------------------------------------------------------------------

def check_out_dir(run_dir: Path) -> None:
    """--out must be (or become) a directory this process can write to."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run directory: choose another --out")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {run_dir}: {parent} is a file, so no directory can be made under it; "
                          "choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".d2v-write-check-", dir=parent))
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: cannot create files in {parent} ({e.strerror}); "
                          "choose a writable --out") from None


_RUNTIME_ONLY = {"grad_checkpointing"}      # model keys that change how, not what, is computed


def check_same_model(cfg: Config, resume: ResumePoint | None) -> list[str]:
    """Refuse to resume a run with a config that builds another model; return the other settings
    that differ from the run's config.json ("key: old -> new"), which a resume may change."""
    if resume is None:
        return []
    saved_path = resume.ckpt_dir.parent / "config.json"
    if not saved_path.is_file():
        return []
    try:
        saved = from_json(saved_path).to_dict()
    except (ConfigError, ValueError, OSError) as e:
        raise ConfigError(f"{saved_path} cannot be read ({one_line(e)}); restore it or resume into a new --out "
                          "with --resume PATH_TO_CHECKPOINTS") from None
    diffs = _diff(saved, cfg.to_dict())
    model = [d for d in diffs if d[0].startswith("model.") and d[0].split(".")[-1] not in _RUNTIME_ONLY]
    if model:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in model[:4]) + (" ..." if len(model) > 4 else "")
        raise ConfigError(f"--resume: this config builds another model than the run's {saved_path} ({listed}); "
                          f"resume with the run's settings (--from_json {saved_path}) or train into a new --out")
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs
            if not k.startswith("model.") and k not in ("preset", "run.resume", "run.out")]


def _diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.")
        elif (list(x) if isinstance(x, tuple) else x) != (list(y) if isinstance(y, tuple) else y):
            out.append((f"{prefix}{key}", x, y))
    return out
