"""Dotted keys: `--section.key=value` overrides with type coercion, a config read back from JSON, and
the closest key named when one is mistyped or brought from fairseq, MAE, timm or Hugging Face."""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path

from .checks import ConfigError
from .sections import Config


# names users bring from fairseq, MAE, timm or Hugging Face configs -> ours
ALIASES = {"learning_rate": "optim.lr", "max_update": "optim.max_steps", "warmup_updates": "optim.warmup_steps",
           "warmup": "optim.warmup_steps", "adam_betas": "optim.betas", "adam_eps": "optim.eps",
           "clip_norm": "optim.clip_grad", "max_grad_norm": "optim.clip_grad", "mask_ratio": "mask.mask_prob",
           "hidden_size": "model.embed_dim", "num_layers": "model.depth", "num_hidden_layers": "model.depth",
           "num_attention_heads": "model.num_heads", "input_size": "model.image.img_size",
           "save_interval_updates": "run.save_every", "log_interval": "run.log_every",
           "keep_interval_updates": "run.keep_last", "epochs": "optim.max_steps", "max_steps": "optim.max_steps",
           "drop_path_rate": "finetune.drop_path", "smoothing": "finetune.label_smoothing",
           "aa": "finetune.auto_augment", "nb_knn": "eval.k", "model_path": "finetune.init"}


def suggest_key(key: str) -> str | None:
    """The config key a mistyped or foreign `key` most likely means (None: no good guess)."""
    keys = all_keys()
    last = key.split(".")[-1]
    same_last = [k for k in keys if k.split(".")[-1] == last and k != key]
    if same_last:                                   # --lr -> --optim.lr, --data.clone_batch -> --mask.clone_batch
        return same_last[0]
    if last in ALIASES:
        return ALIASES[last]
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = {k.split(".")[-1]: k for k in keys if section and k.startswith(section)}
    close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return close[0] if close else None


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _dataclass_of(tp):
    """The dataclass inside `X | None`, or None."""
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        sub = _dataclass_of(tp)
        if sub is not None:
            keys += all_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(value, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for t in args:
            if t is not type(None):
                return _coerce(value, t, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"--{key}={value!r}: expected true or false")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}={value!r}: expected {tp.__name__}") from None
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"--{key}={value!r}: expected {len(args)} comma-separated values")
        return tuple(_coerce(v, t, key) for v, t in zip(value, args))
    return value


def set_key(cfg, key: str, value) -> None:
    """Set a dotted key (`mask.clone_batch`) with type coercion; unknown keys name the closest match."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        hints = _hints(type(obj))
        if part not in hints:
            close = suggest_key(key)
            hint = f"; did you mean --{close}?" if close else "; `d2v show_config` lists every key"
            raise ConfigError(f"unknown config key --{key}{hint}")
        tp = hints[part]
        sub = _dataclass_of(tp)
        if i == len(parts) - 1:
            if sub is not None:
                raise ConfigError(f"--{key} is a section; set one of its keys, e.g. --{key}.{next(iter(_hints(sub)))}")
            setattr(obj, part, _coerce(value, tp, key))
            return
        if sub is None:
            raise ConfigError(f"unknown config key --{key}: {'.'.join(parts[:i + 1])} is not a section")
        if getattr(obj, part) is None:
            setattr(obj, part, sub())
        obj = getattr(obj, part)


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    for key, value in overrides.items():
        set_key(cfg, key, value)
    return cfg


def from_dict(d: dict, cls=Config):
    kwargs = {}
    hints = _hints(cls)
    for name, value in d.items():
        if name not in hints:
            raise ConfigError(f"unknown config key {name!r} in {cls.__name__}")
        sub = _dataclass_of(hints[name])
        if sub is not None and isinstance(value, dict):
            kwargs[name] = from_dict(value, sub)
        else:
            kwargs[name] = _coerce(value, hints[name], name) if value is not None else None
    return cls(**kwargs)


def from_json(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))
