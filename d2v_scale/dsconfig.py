"""The DeepSpeed JSON: loaded, `--ds.*` overrides applied, "auto" values filled from the config,
checked by DeepSpeed's own validation, and the settings the trainer reads back from it.

The JSON owns the system settings (micro batch, accumulation, bf16, ZeRO stage, clipping, offload);
`config.py` owns the rest. A ds_config with an `optimizer` or `scheduler` section is refused: AdamW and
the warmup + cosine schedule are d2v_scale's own (`optim.py`).
"""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import torch
from pydantic import ValidationError

from .config import Config, ConfigError
from .dist import select_accelerator
from .errors import one_line

SHIPPED_DS_CONFIGS = Path(__file__).parent.parent / "ds_configs"


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
    # cuda=True without a GPU here: judged as on a bf16 GPU (a GPU run checked from a login node)
    bf16_ok = bool(cuda and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()))
    autocast = ds.get("torch_autocast")
    if isinstance(autocast, dict):               # fp32 weights, bf16 matmuls: torch autocast, no bf16 wrapper
        if autocast.get("enabled") == "auto":
            autocast["enabled"] = bf16_ok
        if autocast.get("enabled"):
            autocast.setdefault("dtype", "bfloat16")
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = bf16_ok and autocast_dtype(ds) is None
    if bf16.get("enabled") and autocast_dtype(ds) is not None:
        raise ConfigError(f"ds_config {path}: bf16 and torch_autocast are both enabled; pick one (torch_autocast keeps "
                          "fp32 weights and runs matmuls in bf16, bf16 keeps bf16 weights with fp32 masters)")
    if (ds.get("bf16", {}).get("enabled") is True and zero_stage(ds) == 0
            and str(ds.get("data_types", {}).get("grad_accum_dtype")) in FP32_NAMES):
        raise ConfigError(f"ds_config {path}: data_types.grad_accum_dtype fp32 with bf16 needs ZeRO stage >= 1 "
                          "(DeepSpeed refuses the mix at stage 0); use ds_configs/zero1.json, or zero0_autocast.json "
                          "for fp32 weights")
    if ds.get("fp16", {}).get("enabled") and not cuda:
        raise ConfigError("fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32 (set fp16.enabled false)")
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


FP32_NAMES = ("fp32", "float32", "float", "torch.float32")      # DeepSpeed's DtypeEnum spellings of fp32


def bf16_accumulation_warning(cfg: Config, world: int, overrides: dict | None = None) -> str | None:
    """One line when the ds_config, on a bf16 GPU, sums micro-step gradients in bf16 (gradient
    accumulation with bf16 on and `data_types.grad_accum_dtype` not fp32): each micro-step's gradient
    then rounds to 8 mantissa bits as it is added. None when nothing accumulates in bf16."""
    try:
        ds = resolve_ds_config(cfg, world, overrides, cuda=True)
    except ConfigError as e:                 # fine here (no GPU), refused on one: say so, do not stop
        return f"on a GPU: {e}"
    gas = ds["gradient_accumulation_steps"]
    if not ds.get("bf16", {}).get("enabled") or gas < 2:
        return None
    if str(ds.get("data_types", {}).get("grad_accum_dtype")) in FP32_NAMES:
        return None
    if zero_stage(ds) == 0:
        return (f"ds_config {cfg.run.ds_config}: on a GPU, bf16 at ZeRO-0 sums the {gas} micro-step gradients in "
                "bf16 (DeepSpeed has no fp32 accumulation at stage 0); use ds_configs/zero1.json (fp32 "
                "accumulation) or zero0_autocast.json (fp32 weights and gradients)")
    return (f"ds_config {cfg.run.ds_config}: on a GPU, bf16 with {gas} micro-steps sums gradients in bf16; add "
            '"data_types": {"grad_accum_dtype": "fp32"} (as the shipped ds_configs do)')


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
    select_accelerator()                  # DeepSpeed picks its accelerator when first imported
    from deepspeed.runtime.config import DeepSpeedConfig
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


def compute_dtype(ds: dict) -> torch.dtype:
    """The dtype of the weights and of floating-point inputs (fp32 under torch_autocast)."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def autocast_dtype(ds: dict) -> torch.dtype | None:
    """The dtype torch_autocast runs matmuls in, or None when it is off."""
    section = ds.get("torch_autocast")
    if not isinstance(section, dict) or section.get("enabled") is not True:
        return None
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16}.get(str(section.get("dtype", "bfloat16")), torch.bfloat16)


def matmul_dtype(ds: dict) -> torch.dtype:
    """The precision the model's matmuls run in: what the GEMM peak is measured in."""
    return autocast_dtype(ds) or compute_dtype(ds)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
