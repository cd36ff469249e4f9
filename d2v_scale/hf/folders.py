"""`d2v import-hf` and `d2v export --format hf`: transformers save_pretrained folders (config.json +
model.safetensors, a sharded index or pytorch_model.bin read weights-only) in and out; the names
(keys.py) and configs (configs.py) are mapped apart.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import one_line
from ..export import check_writable, write_weights
from ..pretrained import read_encoder
from .configs import HF_CLASSES, HF_TYPES, HFError, check_maps, config_from_hf, hf_config
from .keys import from_hf_state, head_from_hf, to_hf_state


def read_hf_config(folder: str | Path) -> dict:
    """The config.json dict of a save_pretrained folder of a model type import-hf reads."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HFError(f"{folder} has no config.json: give the folder `save_pretrained` wrote (or a local "
                      "snapshot of a hub model); nothing is downloaded")
    try:
        hc = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{folder / 'config.json'} is not valid JSON ({one_line(e)})") from None
    if not isinstance(hc, dict) or hc.get("model_type") not in HF_TYPES:
        kind = hc.get("model_type") if isinstance(hc, dict) else None
        raise HFError(f"{folder} holds model_type={kind!r}; d2v import-hf reads {', '.join(HF_TYPES)} "
                      "(Data2VecVisionModel, Data2VecAudioModel, Data2VecTextModel, RobertaModel, BeitModel "
                      "and their task models)")
    return hc


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a save_pretrained folder: model.safetensors, a sharded
    model.safetensors.index.json, or pytorch_model.bin (read with weights_only=True)."""
    folder = Path(folder)
    try:
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
        if (folder / "model.safetensors.index.json").is_file():
            shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(str(folder / shard)))
            return state
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise HFError(f"{folder}: its weights cannot be read ({type(e).__name__}: {one_line(e)[:160]})") from None
    except Exception as e:  # noqa: BLE001 - torch.load refusing a pickled object, a truncated file
        raise HFError(f"{folder}/pytorch_model.bin cannot be read with weights_only=True "
                      f"({type(e).__name__}: {one_line(e)[:160]}); save the model with safetensors") from None
    raise HFError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _mask_token_id(folder: Path) -> int:
    """The `<mask>` id of the folder's tokenizer.json, -1 when there is none."""
    try:
        added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        return next((int(t["id"]) for t in added if t.get("content") == "<mask>"), -1)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        return -1


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise HFError(f"{path} exists; pass --overwrite to replace it, or choose another path")


def import_hf(folder: str | Path, out: str | Path, overwrite: bool = False, algorithm: str = "data2vec") -> dict:
    """`d2v import-hf`: a transformers data2vec folder -> a d2v_scale encoder weights file."""
    out = Path(out)
    _refuse_existing(out, overwrite)
    check_writable(out)
    hc = read_hf_config(folder)
    try:
        cfg = config_from_hf(hc, _mask_token_id(Path(folder)), algorithm)
    except (KeyError, TypeError) as e:
        raise HFError(f"{Path(folder) / 'config.json'} lacks or mistypes {one_line(e)}: not a complete "
                      f"{hc['model_type']} config; save the model again with save_pretrained") from None
    hf_state = read_hf_weights(folder)
    state, left_out, initialised = from_hf_state(cfg, hf_state)
    if "mask_token" in initialised:
        torch.nn.init.trunc_normal_(state["mask_token"], std=0.02, a=-0.02, b=0.02)   # data2vec_vision's init
    if "mask_emb" in initialised:
        torch.nn.init.uniform_(state["mask_emb"])                          # wav2vec 2.0's
    head, taken = head_from_hf(cfg, hc, hf_state)
    summary = {"out": str(out), "from": hc["model_type"], "modality": cfg.model.modality,
               "algorithm": cfg.model.algorithm}
    if head:                                                               # a fine-tuned classifier: keep its head
        left_out = [k for k in left_out if k not in taken]
        num_classes = int((head.get("head.weight", head.get("head.out_proj.weight"))).shape[0])
        write_weights(out, {**{f"encoder.{k}": v for k, v in state.items()}, **head}, cfg.to_dict(), "classifier",
                      {"num_classes": num_classes, "source": hc["model_type"]})
        summary["classifier"] = {"num_classes": num_classes, "head": sorted(head)}
    else:
        write_weights(out, state, cfg.to_dict(), "encoder")
    return {**summary, "tensors": len(state) + len(head),
            "params": sum(v.numel() for v in [*state.values(), *head.values()]), "left_out": left_out[:20],
            "initialised": initialised}


def export_hf(source: str | Path, out: str | Path, teacher: bool = False, tag: str | None = None,
              overwrite: bool = False) -> dict:
    """`d2v export --format hf`: any encoder `load_encoder` reads -> a save_pretrained folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HFError(f"{out} is a file; --format hf writes a folder (config.json, model.safetensors)")
    _refuse_existing(out, overwrite)
    weights = read_encoder(source, teacher, tag)
    cfg = weights.cfg
    check_maps(cfg)
    hf_state = to_hf_state(cfg, weights.encoder)
    hc = hf_config(cfg, "mask_emb" in weights.encoder)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise HFError(f"cannot write {out}: {parent} is not writable; choose another output folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hc, indent=2) + "\n")
    if out.exists():                                                       # --overwrite: swap, then drop the old
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return {"out": str(out), "class": HF_CLASSES[cfg.model.modality], "model_type": hc["model_type"],
            "tensors": len(hf_state), "params": sum(v.numel() for v in hf_state.values()),
            "left_out": sorted(weights.head),                             # a classifier's head: not an encoder's
            "load": f"transformers.AutoModel.from_pretrained('{out}')"}
