"""Everything a run checks before any rank starts work, and the settings it resolves on the way.

The config's values, the DeepSpeed config (DeepSpeed's own validation, and keys DeepSpeed would
silently ignore), the shards (schemes, existence, tar headers, the index's modality), the masks on
the token grid, the run directory (a writable directory; checkpoints there need `--resume`), the
checkpoint to resume from (newest that reads back) and the model it was trained with. `d2v check`
runs this in one process before any launcher starts ranks; `d2v train` runs it on every rank before
the ranks wait on each other. Nothing here writes to the run directory.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import ResumePoint, find_resume
from .config import Config, ConfigError, from_json
from .data import Shards, check_shards, find_shards
from .data.shards import DataError
from .errors import one_line

SHIPPED_DS_CONFIGS = Path(__file__).parent.parent / "ds_configs"


@dataclass
class Preflight:
    shards: Shards
    ds: dict                                        # the resolved DeepSpeed config
    resume: ResumePoint | None                      # None: start from scratch
    changed: list[str] = field(default_factory=list)   # settings that differ from the resumed run's


def preflight(cfg: Config, ds_overrides: dict | None, world: int, every_shard: bool = True) -> Preflight:
    """Raise ConfigError / DataError / MaskError / CheckpointError with the fix, or return what the run
    will use. `every_shard`: read the tar header of every local shard (else the first only)."""
    cfg.validate()
    shards = find_shards(cfg.data.path, cfg.data.allow_pipe)
    check_shards(shards, cfg.model.modality, cfg.data.path, every_local=every_shard)
    resolve_from_data(cfg, shards)
    check_mask(cfg)
    W = max(1, cfg.data.num_workers)
    if cfg.data.sampling == "split" and len(shards.urls) < world * W:
        raise DataError(f"{len(shards.urls)} shards cannot be split over {world} ranks x {W} workers: make more "
                        "shards (d2v-shard --maxcount), use fewer --data.num_workers, or --data.sampling=resample")
    ds = resolve_ds_config(cfg, world, ds_overrides)
    validate_ds_config(ds, cfg.run.ds_config)
    run_dir = Path(cfg.run.out)
    check_out_dir(run_dir)
    resume = find_resume(run_dir, cfg.run.resume, world)
    changed = check_same_model(cfg, resume)
    if resume is not None and resume.universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return Preflight(shards, ds, resume, changed)


# -- DeepSpeed config ------------------------------------------------------------------------------

def resolve_ds_config(cfg: Config, world: int, overrides: dict | None = None, cuda: bool | None = None) -> dict:
    """Load the DeepSpeed JSON, apply `ds.*` overrides, fill "auto" values from cfg, check consistency."""
    path = Path(cfg.run.ds_config)
    if not path.is_file():
        shipped = ", ".join(sorted(p.name for p in SHIPPED_DS_CONFIGS.glob("*.json")))
        raise ConfigError(f"ds_config {path} not found (shipped in ds_configs/: {shipped})")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object (DeepSpeed's config), not {type(ds).__name__}")
    for key, value in (overrides or {}).items():
        node = ds
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--ds.{key}: {p} is not a section of the ds_config")
        node[leaf] = value
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"ds_config {path} has a {section!r} section: d2v_scale builds AdamW and the "
                              f"warmup+cosine schedule itself (set --optim.* instead); remove it")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    micro = cfg.data.batch_size
    if cfg.data.global_batch:
        if cfg.data.global_batch % (micro * world):
            raise ConfigError(f"data.global_batch={cfg.data.global_batch} is not a multiple of data.batch_size="
                              f"{micro} x {world} ranks; pick a batch size that divides it")
        gas = cfg.data.global_batch // (micro * world)
    else:
        gas = 1
    auto = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
            "train_batch_size": micro * gas * world, "gradient_clipping": cfg.optim.clip_grad}
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if not isinstance(ds[key], int) or isinstance(ds[key], bool) or ds[key] < 1:
            raise ConfigError(f"ds_config {key}={ds[key]!r}: must be an integer >= 1, or \"auto\"")
    clip = ds["gradient_clipping"]
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not math.isfinite(clip) or clip < 0:
        raise ConfigError(f"ds_config gradient_clipping={clip!r}: must be a number >= 0, or \"auto\"")
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world:
        raise ConfigError(f"ds_config: train_batch_size {ds['train_batch_size']} != micro batch "
                          f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']} "
                          f"x world {world}; set them to \"auto\" to derive them from --data.batch_size/global_batch")
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bool(cuda and torch.cuda.is_bf16_supported())
    if ds.get("fp16", {}).get("enabled") and not cuda:
        raise ConfigError("fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32 (set fp16.enabled false)")
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class _ReadKeys(dict):
    """A dict that records which keys are asked for (copies share the record)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16",
             "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
             "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer"}


def validate_ds_config(ds: dict, path: str) -> None:
    """DeepSpeed's own validation of the resolved config (typed sections, batch sizes), and top-level
    keys DeepSpeed never reads (a typo there is silently ignored by DeepSpeed)."""
    from .dist import select_accelerator
    select_accelerator()
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError
    probe = _ReadKeys(ds)                  # DeepSpeedConfig sees a world of 1 without a process group
    probe["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        where = _SECTIONS.get(e.title, e.title)
        errs = "; ".join(f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"ds_config {path}: {errs} (fix the JSON or the --ds.* override)") from None
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"ds_config {path}: DeepSpeed rejects it: {one_line(e) or type(e).__name__}") from None
    unknown = sorted(set(ds) - probe.read)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(probe.read), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else "; DeepSpeed would ignore it"
        raise ConfigError(f"ds_config {path}: unknown key {unknown[0]!r}{hint}")


# -- data-derived settings and masks ----------------------------------------------------------------

def resolve_from_data(cfg: Config, shards: Shards) -> None:
    """Settings that come from the shards: the text vocabulary size (the index records it)."""
    m = cfg.model
    if m.modality != "text" or m.text.vocab_size > 0:
        return
    vocab = shards.index.get("vocab_size", 0)
    if vocab:
        m.text.vocab_size = int(vocab)
        return
    raise ConfigError("model.text.vocab_size is unknown: pass --data INDEX.json written by `d2v-shard text` "
                      "(it records the sentencepiece vocabulary) or set --model.text.vocab_size")


def check_mask(cfg: Config) -> None:
    """Raise MaskError now if the mask settings cannot be met on the model's token grid."""
    from .masking import block_mask, random_mask
    m, gen = cfg.model, torch.Generator().manual_seed(0)
    if m.modality == "image":
        grid = (m.image.img_size // m.image.patch_size,) * 2
    elif m.modality == "text":
        grid = (cfg.data.tokens_per_sample,)
    else:
        from .models.audio import frames_for
        grid = (frames_for(m.audio.feature_encoder_spec, cfg.data.min_sample_size),)
    if cfg.mask.mask_length <= 1:
        random_mask(1, math.prod(grid), cfg.mask.mask_prob, gen)
    else:
        block_mask(1, grid, cfg.mask.mask_prob, cfg.mask.mask_length, cfg.mask.mask_prob_adjust,
                   cfg.mask.inverse_mask, gen)


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
