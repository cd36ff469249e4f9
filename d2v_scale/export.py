"""Weights files (safetensors): the format encoders leave d2v_scale in, and come back in.

* `d2v export RUN_DIR OUT.safetensors` (`export_run`): the consolidated fp32 student encoder of a
  run's newest checkpoint (any ZeRO stage, read through checkpoint.py), keys as in `models/`
  (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, ...); `--teacher` also writes
  OUT.teacher.safetensors with the EMA teacher.
* `d2v import-fairseq` (fairseq.py) writes the student (`encoder.*`, `decoder.*`) and teacher
  (`teacher.*`) of a fairseq checkpoint through `write_weights`; `--run.init_from=OUT.safetensors`
  continues pretraining from it (`read_weights`).
* `d2v finetune` writes classifiers (`encoder.*`, `fc_norm.*`, `head.*`; `d2v export` of its run too).
The config travels in the file's metadata as JSON (with `info`: classes, accuracy, for classifiers).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import CKPT_DIR, consolidated_state, read_teacher_state
from .errors import D2VError, one_line
from .outputs import OutputError, atomic, check_output


class WeightsError(D2VError, ValueError):
    """A weights file that cannot be read or written where asked."""


def check_writable(path: str | Path, overwrite: bool = True) -> Path:
    """`path` as a Path if a weights file can be written there (outputs.check_output: never inside a
    run's checkpoints; an existing file only with `overwrite`); WeightsError with the fix otherwise."""
    try:
        return check_output(path, overwrite)
    except OutputError as e:
        raise WeightsError(str(e)) from None


def write_weights(path: str | Path, tensors: dict[str, torch.Tensor], cfg_dict: dict, kind: str,
                  info: dict | None = None) -> None:
    """kind: encoder | model | classifier. Written as `.partial` and renamed (atomic; no `.partial` is
    left by a failed or interrupted write)."""
    path = check_writable(path)
    meta = {"format": f"d2v_scale/{kind}-v1", "config": json.dumps(cfg_dict)}
    if info:
        meta["info"] = json.dumps(info)
    with atomic(path) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def _metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({one_line(e)[:160]}); "
                           "write it with `d2v export` or `d2v import-fairseq`") from None


def read_info(path: str | Path) -> dict:
    """The `info` a classifier file carries (classes, accuracy), {} for other files."""
    return json.loads(_metadata(path).get("info", "{}"))


def read_weights_config(path: str | Path) -> dict:
    """The config dict in a weights file's metadata, without reading the tensors."""
    return json.loads(_metadata(path).get("config", "{}"))


def read_weights(path: str | Path) -> tuple[dict, dict, dict]:
    """(student state_dict, teacher state_dict, config dict) from any d2v_scale weights file."""
    if not Path(path).is_file():
        raise WeightsError(f"weights file {path} not found (write one with `d2v export` or `d2v import-fairseq`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({one_line(e)[:160]}); "
                           "write it with `d2v export` or `d2v import-fairseq`") from None
    kind = meta.get("format", "")
    if kind.startswith("d2v_scale/encoder"):
        return {f"encoder.{k}": v for k, v in tensors.items()}, {}, json.loads(meta.get("config", "{}"))
    if kind.startswith("d2v_scale/model"):
        student = {k: v for k, v in tensors.items() if not k.startswith("teacher.")}
        teacher = {k[len("teacher."):]: v for k, v in tensors.items() if k.startswith("teacher.")}
        return student, teacher, json.loads(meta.get("config", "{}"))
    if kind.startswith("d2v_scale/classifier"):
        return tensors, {}, json.loads(meta.get("config", "{}"))
    raise WeightsError(f"{path} is not a d2v_scale weights file (metadata format {kind!r}); write it with "
                       "`d2v export` or `d2v import-fairseq`")


def read_weight_shapes(path: str | Path) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(student, teacher) {name: shape} of a weights file as `read_weights` would name them, from the
    file's header alone (no tensor is read): what a pre-flight compares with the model it will build."""
    if not Path(path).is_file():
        raise WeightsError(f"weights file {path} not found (write one with `d2v export` or `d2v import-fairseq`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({one_line(e)[:160]}); "
                           "write it with `d2v export` or `d2v import-fairseq`") from None
    kind = meta.get("format", "")
    if kind.startswith("d2v_scale/encoder"):
        return {f"encoder.{k}": v for k, v in shapes.items()}, {}
    if kind.startswith("d2v_scale/model"):
        return ({k: v for k, v in shapes.items() if not k.startswith("teacher.")},
                {k[len("teacher."):]: v for k, v in shapes.items() if k.startswith("teacher.")})
    if kind.startswith("d2v_scale/classifier"):
        return shapes, {}
    raise WeightsError(f"{path} is not a d2v_scale weights file (metadata format {kind!r}); write it with "
                       "`d2v export` or `d2v import-fairseq`")


def export_run(run_dir: str | Path, out: str | Path, teacher: bool = False, tag: str | None = None,
               overwrite: bool = False) -> dict:
    """`d2v export`: a run's checkpoint (read through checkpoint.py) -> encoder weights files; an
    existing OUT (or OUT.teacher.safetensors) only replaced with `overwrite`."""
    check_writable(out, overwrite)
    if teacher:
        check_writable(Path(out).with_suffix(".teacher.safetensors"), overwrite)
    state, tag = consolidated_state(Path(run_dir), tag)
    cfg_path = Path(run_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if "head.weight" in state:                                   # a `d2v finetune` run: encoder + head
        if teacher:
            raise WeightsError(f"{run_dir} is a fine-tuning run: it has no EMA teacher; drop --teacher")
        write_weights(out, state, cfg, "classifier", {"num_classes": int(state["head.weight"].shape[0]), "step": tag})
        return {"classifier": str(out), "tag": tag, "tensors": len(state),
                "params": sum(v.numel() for v in state.values())}
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    write_weights(out, encoder, cfg, "encoder")
    written = {"encoder": str(out), "tag": tag, "tensors": len(encoder),
               "params": sum(v.numel() for v in encoder.values())}
    if teacher:
        t_out = Path(out).with_suffix(".teacher.safetensors")
        write_weights(t_out, read_teacher_state(Path(run_dir) / CKPT_DIR / tag), cfg, "encoder")
        written["teacher"] = str(t_out)
    return written
