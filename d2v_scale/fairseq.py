"""Import fairseq data2vec 2.0 (`data2vec_multi`) checkpoints.

A fairseq checkpoint holds `ckpt["cfg"]["model"]` (the resolved `Data2VecMultiConfig`) and
`ckpt["model"]` (the student state_dict, the fp32 EMA teacher nested under `"_ema"`).
`from_fairseq(ckpt)` rebuilds the student and teacher with d2v_scale modules; its forward takes the
source batch and a precomputed (B*M, T) mask and returns fairseq's summed `loss`, `sample_size`,
`pred_var` and `target_var`. Key names map one to one (reference 8.2-8.4); the prenet blocks
(`context_encoder.blocks.j`) come first in `encoder.blocks`, then the shared ones.
`load_fairseq_checkpoint` reads any reference checkpoint weights-only (`d2v import-fairseq`: imports.py).
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import (AudioConfig, Config, DecoderConfig, ImageConfig, MaskConfig, ModelConfig,
                     TeacherConfig, TextConfig)
from .d2v import Data2Vec
from .errors import D2VError, one_line
from .pickles import foreign_globals
from .teacher import ReplicatedTeacher

# fairseq options that are off in every released config and not implemented here
_UNSUPPORTED = ("layer_norm_first", "end_of_block_targets", "recon_loss", "loss_beta",
                "batch_norm_target_layer", "shared_decoder", "mae_init")


class FairseqImportError(D2VError, ValueError):
    """A fairseq checkpoint that cannot be mapped onto d2v_scale."""


def config_from_fairseq(fcfg: dict, vocab_size: int = 0) -> Config:
    """Our Config from a fairseq `cfg["model"]` dict (as checkpoints and the golden files store it)."""
    for key in _UNSUPPORTED:
        if fcfg.get(key):
            raise FairseqImportError(f"fairseq option {key}={fcfg[key]!r} is not supported: d2v_scale implements "
                               "the released data2vec 2.0 configs, where it is off")
    modality = str(fcfg.get("supported_modality", "IMAGE")).lower()
    mc = fcfg["modalities"][modality]
    dec = mc["decoder"]
    if dec.get("add_positions_masked") or dec.get("add_positions_all"):
        raise FairseqImportError("decoder add_positions_* is not supported (off in every released config)")
    model = ModelConfig(
        modality=modality, embed_dim=fcfg["embed_dim"], depth=fcfg["depth"], prenet_depth=mc["prenet_depth"],
        num_heads=fcfg["num_heads"], mlp_ratio=float(fcfg["mlp_ratio"]), norm_eps=float(fcfg["norm_eps"]),
        encoder_dropout=fcfg["encoder_dropout"], attention_dropout=fcfg["attention_dropout"],
        activation_dropout=fcfg["activation_dropout"], post_mlp_drop=fcfg["post_mlp_drop"],
        dropout_input=fcfg["dropout_input"], prenet_dropout=mc["prenet_dropout"],
        start_drop_path_rate=fcfg["start_drop_path_rate"], end_drop_path_rate=fcfg["end_drop_path_rate"],
        prenet_drop_path_rate=mc.get("start_drop_path_rate", 0.0),
        layerdrop=fcfg["layerdrop"], prenet_layerdrop=mc["prenet_layerdrop"],
        average_top_k_layers=fcfg["average_top_k_layers"],
        instance_norm_target_layer=fcfg["instance_norm_target_layer"],
        layer_norm_target_layer=fcfg["layer_norm_target_layer"],
        layer_norm_targets=fcfg["layer_norm_targets"], instance_norm_targets=fcfg["instance_norm_targets"],
        loss_scale=fcfg.get("loss_scale"), cls_loss=float(fcfg.get("cls_loss", 0) or 0),
        decoder=DecoderConfig(
            decoder_dim=dec["decoder_dim"], decoder_layers=dec["decoder_layers"],
            decoder_kernel=dec["decoder_kernel"], decoder_groups=dec["decoder_groups"],
            decoder_residual=dec["decoder_residual"], projection_layers=dec["projection_layers"],
            projection_ratio=float(dec["projection_ratio"]), input_dropout=dec["input_dropout"]))
    if modality == "image":
        model.image = ImageConfig(img_size=mc["input_size"], patch_size=mc["patch_size"], in_chans=mc["in_chans"])
    elif modality == "audio":
        model.audio = AudioConfig(feature_encoder_spec=mc["feature_encoder_spec"],
                                  conv_pos_width=mc["conv_pos_width"], conv_pos_depth=mc["conv_pos_depth"],
                                  conv_pos_groups=mc["conv_pos_groups"], use_alibi=mc["use_alibi_encoder"])
    else:
        model.text = TextConfig(vocab_size=vocab_size, max_positions=mc["max_source_positions"],
                                dropout=mc["dropout"])
    return Config(
        model=model,
        mask=MaskConfig(mask_prob=mc["mask_prob"], mask_prob_adjust=mc["mask_prob_adjust"],
                        mask_length=mc["mask_length"], inverse_mask=mc["inverse_mask"],
                        clone_batch=fcfg["clone_batch"], mask_noise_std=mc["mask_noise_std"]),
        teacher=TeacherConfig(ema_decay=fcfg["ema_decay"], ema_end_decay=fcfg["ema_end_decay"],
                              ema_anneal_end_step=fcfg["ema_anneal_end_step"]))


# -- key names ---------------------------------------------------------------------------------

_RULES = [  # (fairseq pattern after `modality_encoders.X.`, ours after `encoder.`)
    (r"extra_tokens", "cls_token"),
    (r"local_encoder\.proj\.(.*)", r"patch_embed.proj.\1"),
    (r"context_encoder\.norm\.(.*)", r"norm_pre.\1"),
    (r"alibi_scale", "alibi_scale"),
    (r"local_encoder\.conv_layers\.(\d+)\.0\.(.*)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"local_encoder\.conv_layers\.(\d+)\.2\.1\.(.*)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"project_features\.1\.(.*)", r"feature_norm.\1"),
    (r"project_features\.2\.(.*)", r"feature_proj.\1"),
    (r"relative_positional_encoder\.(\d+)\.0\.(.*)", lambda m: f"pos_conv.{int(m[1]) - 1}.conv.{m[2]}"),
    (r"local_encoder\.embed_tokens\.(.*)", r"embed_tokens.\1"),
    (r"local_encoder\.embed_positions\.(.*)", r"embed_positions.\1"),
    (r"local_encoder\.layernorm_embedding\.(.*)", r"norm_embed.\1"),
]


def map_key(key: str, prenet_depth: int, teacher: bool = False) -> str | None:
    """Our key for a fairseq key (None: not stored by us, e.g. the fixed sin-cos table)."""
    enc = "" if teacher else "encoder."
    if m := re.fullmatch(r"blocks\.(\d+)\.(.*)", key):
        return f"{enc}blocks.{int(m[1]) + prenet_depth}.{m[2]}"
    if teacher and (m := re.fullmatch(r"(\d+)\.(.*)", key)):        # text `_ema`: the ModuleList itself
        return f"blocks.{int(m[1]) + prenet_depth}.{m[2]}"
    m = re.fullmatch(r"modality_encoders\.[A-Z]+\.(.*)", key)
    if not m:
        raise FairseqImportError(f"unexpected fairseq key {key!r}")
    rest = m[1]
    if rest == "fixed_positional_encoder.positions":
        return None
    if mm := re.fullmatch(r"context_encoder\.blocks\.(\d+)\.(.*)", rest):
        return f"{enc}blocks.{mm[1]}.{mm[2]}"
    if mm := re.fullmatch(r"decoder\.blocks\.(\d+)\.0\.(.*)", rest):
        return f"decoder.blocks.{mm[1]}.conv.{mm[2]}"
    if mm := re.fullmatch(r"decoder\.(proj.*)", rest):
        return f"decoder.{mm[1]}"
    for pat, rep in _RULES:
        if re.fullmatch(pat, rest):
            return enc + re.sub(pat, rep, rest) if not callable(rep) else enc + rep(re.fullmatch(pat, rest))
    raise FairseqImportError(f"unexpected fairseq key {key!r}")


def convert_state(state: dict, prenet_depth: int, teacher: bool, positions_check: torch.Tensor | None = None):
    out = {}
    for k, v in state.items():
        ours = map_key(k, prenet_depth, teacher)
        if ours is None:
            if positions_check is not None and not v.is_meta and not torch.allclose(
                    v.float(), positions_check, atol=1e-5):
                raise FairseqImportError(f"{k} differs from the 2-D sin-cos table d2v_scale computes")
            continue
        if ours.endswith("alibi_scale") and v.dim() == 4:      # old 4-D alibi_scale (fairseq upgrade)
            v = v.unsqueeze(0)
        out[ours] = v
    return out


class StudentTeacher(nn.Module):
    """Student + teacher + config, called like fairseq's model: forward(source, mask)."""

    def __init__(self, cfg: Config, student: Data2Vec, teacher: ReplicatedTeacher):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.teacher_module = teacher.module  # registered so .to()/.double() reach it
        self.teacher = teacher

    def forward(self, source: torch.Tensor, mask, padding_mask: torch.Tensor | None = None) -> dict:
        return self.student(source, mask, self.teacher, padding_mask)


def _vocab_size(model_state: dict) -> int:
    for k, v in model_state.items():
        if k.endswith("embed_tokens.weight"):
            return v.shape[0]
    return 0


def from_fairseq(ckpt: dict, strict: bool = True) -> StudentTeacher:
    """Student, teacher and config from a fairseq data2vec 2.0 checkpoint dict."""
    if "model" not in ckpt or "cfg" not in ckpt or "model" not in (ckpt["cfg"] or {}):
        raise FairseqImportError("not a fairseq checkpoint: expected ckpt['model'] and ckpt['cfg']['model']")
    state = dict(ckpt["model"])
    ema = state.pop("_ema", None)
    try:
        cfg = config_from_fairseq(ckpt["cfg"]["model"], vocab_size=_vocab_size(state)).validate()
    except (KeyError, TypeError) as e:
        raise FairseqImportError(f"the checkpoint's cfg['model'] lacks {one_line(e)}: not a data2vec 2.0 "
                                 "(data2vec_multi) checkpoint") from None
    student = Data2Vec(cfg.model, mask_noise_std=cfg.mask.mask_noise_std)
    P = cfg.model.prenet_depth
    pos = getattr(student.encoder, "pos_embed", None)
    sd = convert_state({k: v.float() for k, v in state.items()}, P, teacher=False, positions_check=pos)
    try:
        student.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise FairseqImportError(f"the weights do not fit the model its config describes: {one_line(e)[:300]}") from None
    teacher = ReplicatedTeacher(student.encoder, cfg.model)
    if ema is not None:
        teacher.load_state_dict(convert_state({k: v.float() for k, v in ema.items()}, P, teacher=True,
                                              positions_check=pos))
    elif strict:
        raise FairseqImportError("the checkpoint has no '_ema' teacher; pass strict=False to start the teacher "
                           "from the student")
    return StudentTeacher(cfg, student, teacher)


def load_fairseq_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (numpy scalars in fairseq's extra_state allowed); every
    refusal is one line with the fix."""
    if not Path(path).is_file():
        raise FairseqImportError(f"{path} not found; give the path of a fairseq checkpoint (checkpoint_best.pt)")
    safe = [np.dtype, type(np.dtype("float64")), type(np.dtype("int64")),
            argparse.Namespace]           # the `args` of data2vec_vision and older fairseq checkpoints
    core = getattr(np, "_core", None) or np.core                           # numpy >= 2 names it _core
    safe.append(core.multiarray.scalar)
    with torch.serialization.safe_globals(safe):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            if "GLOBAL" not in text and "Unsupported global" not in text:
                raise FairseqImportError(f"{path} is not a torch checkpoint ({one_line(text)[:120]})") from None
            what = re.search(r"GLOBAL ([\w.]+)", text)
            known, foreign = foreign_globals(path)
            if foreign or not known:
                calls = ", ".join(sorted(foreign)) or (what[1] if what else "code")
                raise FairseqImportError(
                    f"{path} is not a checkpoint: its pickle calls {calls}, which would run when the file is loaded; "
                    "do not load it (not with torch.load(weights_only=False) either): delete it, or get the "
                    "checkpoint again from a source you trust") from None
            fix = (f"python -c \"import torch; from omegaconf import OmegaConf as O; c = torch.load('{path}', "
                   "weights_only=False); m = c['cfg']['model']; torch.save({'model': c['model'], 'cfg': {'model': "
                   "O.to_container(m, resolve=True, enum_to_str=True) if O.is_config(m) else m}}, "
                   f"'{path}.weights.pt')\"")
            raise FairseqImportError(
                f"{path} holds a Python object that torch.load(weights_only=True) refuses ("
                f"{', '.join(sorted(known))}); d2v_scale never unpickles others. Where fairseq is installed and you trust the file, keep only its weights and config: {fix}; "
                f"then import {path}.weights.pt") from None
        except Exception as e:  # noqa: BLE001 - any other failure to parse: not a checkpoint
            raise FairseqImportError(f"{path} is not a torch checkpoint or is truncated "
                                     f"({type(e).__name__}: {one_line(e)[:120]})") from None
    if not isinstance(ckpt, dict):
        raise FairseqImportError(f"{path} holds a {type(ckpt).__name__}, not a fairseq checkpoint dict")
    return ckpt
