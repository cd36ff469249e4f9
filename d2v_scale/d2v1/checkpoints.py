"""data2vec 1 checkpoints of the reference code -> a `Data2Vec1` config, student and EMA teacher.

Three containers (read with `torch.load(weights_only=True)` by fairseq.py's loader):

* fairseq `examples/data2vec/models/data2vec_audio.py` `checkpoint_best.pt`: `cfg["model"]` (a
  `Data2VecAudioConfig` dict, `_name: data2vec_audio`) and `model`,
  the student with wav2vec 2.0 names and the fp32 EMA (`ema_transformer_only`: the Transformer's
  names) under `_ema` (`Data2VecAudioModel.state_dict`).
* fairseq `data2vec_text.py`: `cfg["model"]` (`Data2VecTextConfig`, the encoder's sizes under
  `transformer.encoder`) and `model` with `encoder.sentence_encoder.*`, `encoder.regression_head.*`
  (`encoder.lm_head.*` before the rename) and the EMA of the sentence encoder under `encoder._ema`.
* data2vec_vision `beit/run_cyclical.py` (`utils.save_model`) `checkpoint-799.pth`: `model` (BEiT
  names: `rel_pos_bias`, `blocks.i.gamma_1/2`, `mask_token`, `lm_head`), `model_ema` (timm
  `ModelEmaV2`'s model, the same names), `optimizer`, `scaler`, `epoch` and the `args` Namespace;
  with `--enable_deepspeed` DeepSpeed's `mp_rank_00_model_states.pt` holds the model as `module`
  (fine-tuned ones, with `head` / `fc_norm`, are refused: their pretraining checkpoint imports).

Sizes are read from the tensors; the recipe (targets, loss, masking, EMA) from the checkpoint's
config; everything else is the published recipe's (presets.py). Key names: reference_keys.py.
"""
from __future__ import annotations

import dataclasses
import re
from argparse import Namespace

import torch

from ..config import Config
from ..errors import D2VError, one_line
from ..teacher import ReplicatedTeacher
from .model import Data2Vec1
from .presets import d2v1_audio_base, d2v1_text_base, d2v1_vit_base_patch16
from .reference_keys import from_reference

FAMILIES = {"data2vec_audio": "audio", "data2vec_text": "text", "data2vec_vision": "image"}


class ReferenceCheckpointError(D2VError, ValueError):
    """A data2vec 1 checkpoint that cannot be mapped onto d2v_scale's data2vec 1 model."""


def model_cfg(ckpt: dict) -> dict:
    """fairseq's model config of a checkpoint (`cfg["model"]`; {} for none)."""
    cfg = ckpt.get("cfg")
    return cfg["model"] if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) else {}


def family(ckpt: dict) -> str | None:
    """data2vec_audio | data2vec_text (fairseq) | data2vec_vision (BEiT's run_cyclical.py) | None."""
    name = str(model_cfg(ckpt).get("_name", ""))
    if name in ("data2vec_audio", "data2vec_text"):
        return name
    model = _vision_state(ckpt)
    if isinstance(model, dict) and "cfg" not in ckpt and "patch_embed.proj.weight" in model:
        return "data2vec_vision"
    return None


def _vision_state(ckpt: dict):
    """BEiT's model state: `model` (torch.save), or `module` (run with --enable_deepspeed:
    `mp_rank_00_model_states.pt`)."""
    return ckpt.get("model", ckpt.get("module"))


def _refuse(fcfg: dict, what: str, **want) -> None:
    for key, value in want.items():
        if key in fcfg and fcfg[key] != value:
            raise ReferenceCheckpointError(f"{what} with {key}={fcfg[key]!r}: d2v_scale's data2vec 1 model has "
                                           f"{key}={value!r} (as every released data2vec 1 checkpoint)")


def _blocks(sd: dict, pattern: str) -> int:
    return 1 + max((int(m[1]) for k in sd if (m := re.match(pattern, k))), default=-1)


def _audio_config(fcfg: dict, sd: dict) -> Config:
    """data2vec_audio: Data2VecAudioConfig (on Wav2Vec2Config, whose defaults fill what it leaves out)."""
    _refuse(fcfg, "data2vec_audio", extractor_mode="layer_norm", layer_norm_first=False, activation_fn="gelu")
    c = d2v1_audio_base()
    m = c.model
    D, ffn = sd["encoder.layers.0.fc1.weight"].shape[1], sd["encoder.layers.0.fc1.weight"].shape[0]
    beta = float(fcfg.get("loss_beta", 0) or 0)
    c.model = dataclasses.replace(
        m, embed_dim=D, depth=_blocks(sd, r"encoder\.layers\.(\d+)\."), mlp_ratio=ffn / D,
        num_heads=int(fcfg.get("encoder_attention_heads", 12)),
        encoder_dropout=float(fcfg.get("dropout", 0.1)), attention_dropout=float(fcfg.get("attention_dropout", 0.1)),
        activation_dropout=float(fcfg.get("activation_dropout", 0.0)),
        dropout_input=float(fcfg.get("dropout_input", 0.0)), layerdrop=float(fcfg.get("encoder_layerdrop", 0.0)),
        average_top_k_layers=int(fcfg.get("average_top_k_layers", 8)),
        instance_norm_target_layer=bool(fcfg.get("instance_norm_target_layer", False)),
        layer_norm_target_layer=bool(fcfg.get("layer_norm_target_layer", False)),
        instance_norm_targets=bool(fcfg.get("instance_norm_targets", False)),
        layer_norm_targets=bool(fcfg.get("layer_norm_targets", False)), loss_scale=fcfg.get("loss_scale"),
        audio=dataclasses.replace(
            m.audio, feature_encoder_spec=str(fcfg.get("conv_feature_layers", m.audio.feature_encoder_spec)),
            conv_pos_width=int(fcfg.get("conv_pos", 128)), conv_pos_depth=int(fcfg.get("pos_conv_depth", 1)),
            conv_pos_groups=int(fcfg.get("conv_pos_groups", 16)), conv_bias=bool(fcfg.get("conv_bias", False)),
            feature_grad_mult=float(fcfg.get("feature_grad_mult", 1.0))),
        d2v1=dataclasses.replace(m.d2v1, recipe="imported fairseq data2vec_audio checkpoint (optimizer and schedule: "
                                 "base_librispeech.yaml)", loss_beta=beta,
                                 require_same_masks=bool(fcfg.get("require_same_masks", True))))
    c.mask = dataclasses.replace(c.mask, mask_prob=float(fcfg.get("mask_prob", 0.65)),
                                 mask_length=int(fcfg.get("mask_length", 10)))
    c.teacher = _fairseq_ema(fcfg, c)
    return c


def _text_config(fcfg: dict, sd: dict) -> Config:
    """data2vec_text: Data2VecTextConfig; the encoder's sizes are fairseq's TransformerConfig under
    `transformer` (RoBERTa: post-LN, learned positions, embedding LayerNorm, GELU, unscaled embeddings)."""
    t = fcfg.get("transformer") or {}
    e = t.get("encoder") or {}
    _refuse(t, "data2vec_text transformer", activation_fn="gelu", layernorm_embedding=True, no_scale_embedding=True)
    _refuse(e, "data2vec_text transformer.encoder", normalize_before=False, learned_pos=True)
    c = d2v1_text_base()
    m = c.model
    pre = "encoder.sentence_encoder."
    vocab, D = sd[pre + "embed_tokens.weight"].shape
    ffn = sd[pre + "layers.0.fc1.weight"].shape[0]
    pad = int(m.text.pad_idx)
    c.model = dataclasses.replace(
        m, embed_dim=D, depth=_blocks(sd, r"encoder\.sentence_encoder\.layers\.(\d+)\."), mlp_ratio=ffn / D,
        num_heads=int(e.get("attention_heads", 12)), encoder_dropout=float(t.get("dropout", 0.1)),
        attention_dropout=float(t.get("attention_dropout", 0.0)),
        average_top_k_layers=int(fcfg.get("average_top_k_layers", 8)),
        instance_norm_target_layer=bool(fcfg.get("instance_norm_target_layer", False)),
        layer_norm_target_layer=bool(fcfg.get("layer_norm_target_layer", False)),
        instance_norm_targets=bool(fcfg.get("instance_norm_targets", False)),
        layer_norm_targets=bool(fcfg.get("layer_norm_targets", False)), loss_scale=fcfg.get("loss_scale"),
        text=dataclasses.replace(m.text, vocab_size=int(vocab),
                                 max_positions=int(sd[pre + "embed_positions.weight"].shape[0]) - pad - 1,
                                 dropout=float(t.get("dropout", 0.1))),
        d2v1=dataclasses.replace(m.d2v1, recipe="imported fairseq data2vec_text checkpoint (optimizer and schedule: "
                                 "text/pretraining/base.yaml)", loss_beta=float(fcfg.get("loss_beta", 0) or 0),
                                 head_layers=2 if "encoder.regression_head.2.weight" in sd else 1))
    c.teacher = _fairseq_ema(fcfg, c)
    return c


def _fairseq_ema(fcfg: dict, c: Config):
    end = fcfg.get("ema_anneal_end_step")
    return dataclasses.replace(c.teacher, ema_decay=float(fcfg.get("ema_decay", c.teacher.ema_decay)),
                               ema_end_decay=float(fcfg.get("ema_end_decay", c.teacher.ema_end_decay)),
                               ema_anneal_end_step=int(end) if isinstance(end, (int, float)) else
                               c.teacher.ema_anneal_end_step)


def _vision_config(args: dict, sd: dict) -> Config:
    """data2vec_vision run_cyclical.py: the sizes from the tensors, the recipe from its `args`."""
    c = d2v1_vit_base_patch16()
    m = c.model
    if args.get("layer_results", "end") != "end":
        raise ReferenceCheckpointError(f"data2vec_vision --layer_results {args['layer_results']!r}: d2v_scale's "
                                       "data2vec 1 vision targets are the block outputs (end, the released recipe)")
    if "rel_pos_bias.relative_position_bias_table" not in sd:
        raise ReferenceCheckpointError("data2vec_vision checkpoint without the shared relative position bias "
                                       "(--disable_rel_pos_bias): d2v_scale's BEiT encoder has one, as the "
                                       "released recipe does")
    D = sd["cls_token"].shape[-1]
    depth = _blocks(sd, r"blocks\.(\d+)\.")
    table = sd["rel_pos_bias.relative_position_bias_table"]                  # ((2g-1)^2 + 3, heads)
    side = (int(round((table.shape[0] - 3) ** 0.5)) + 1) // 2
    patch = sd["patch_embed.proj.weight"].shape[-1]
    targets = args.get("target_layers", "[]")
    try:
        top = [int(i) for i in (_int_list(targets) if isinstance(targets, str) else targets)]
    except ValueError:
        top = []
    if top and top != list(range(depth - len(top), depth)):
        raise ReferenceCheckpointError(f"data2vec_vision --target_layers {top}: d2v_scale averages the top K blocks "
                                       f"(K consecutive ending at block {depth - 1})")
    c.model = dataclasses.replace(
        m, embed_dim=D, depth=depth, num_heads=int(table.shape[1]),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
        attention_dropout=float(args.get("attn_drop_rate", m.attention_dropout)),
        end_drop_path_rate=float(args.get("drop_path", m.end_drop_path_rate)),
        average_top_k_layers=len(top) or m.average_top_k_layers,
        layer_norm_target_layer=not args.get("no_target_layer_norm_last", False),
        instance_norm_target_layer=bool(args.get("target_instance_norm", False)),
        layer_norm_targets=bool(args.get("post_target_layer_norm", m.layer_norm_targets)),
        instance_norm_targets=bool(args.get("post_target_instance_norm", False)),
        image=dataclasses.replace(m.image, img_size=side * patch, patch_size=patch,
                                  in_chans=sd["patch_embed.proj.weight"].shape[1],
                                  layer_scale_init_value=float(args.get("layer_scale_init_value",
                                                                        m.image.layer_scale_init_value)),
                                  shared_rel_pos_bias=True, abs_pos_emb="pos_embed" in sd),
        d2v1=dataclasses.replace(
            m.d2v1, recipe="imported data2vec_vision run_cyclical.py checkpoint (optimizer and schedule: the "
                           "beit/README.md ViT-B command)", loss_beta=float(args.get("l1_beta", m.d2v1.loss_beta)),
            num_mask_patches=int(args.get("num_mask_patches", m.d2v1.num_mask_patches)),
            min_mask_patches_per_block=int(args.get("min_mask_patches_per_block", m.d2v1.min_mask_patches_per_block)),
            max_mask_patches_per_block=int(args.get("max_mask_patches_per_block") or 0)))
    decay = float(args.get("ema_decay", c.teacher.ema_end_decay))
    c.teacher = dataclasses.replace(c.teacher, ema_decay=float(args.get("ema_decay_init", decay)),
                                    ema_end_decay=decay, ema_anneal_end_step=int(args.get("ema_start_at", 0) or 0))
    return c


def _int_list(text: str) -> list[int]:
    """run_cyclical's `--target_layers "[6,7,...]"` (a list literal of ints, read without eval)."""
    if not re.fullmatch(r"\s*\[\s*(\d+\s*(,\s*\d+\s*)*,?)?\s*\]\s*", text):
        raise ValueError(text)
    return [int(i) for i in re.findall(r"\d+", text)]


def _student(ckpt: dict, name: str) -> tuple[dict, dict | None]:
    """(the student's reference state, the EMA teacher's or None)."""
    sd = dict(_vision_state(ckpt) if name == "data2vec_vision" else ckpt["model"])
    if name == "data2vec_audio":
        return sd, sd.pop("_ema", None)
    if name == "data2vec_text":
        ema = sd.pop("encoder._ema", None)
        for k in [k for k in sd if k.startswith("encoder.lm_head.")]:    # before fairseq renamed it
            sd["encoder.regression_head." + k[len("encoder.lm_head."):]] = sd.pop(k)
        return sd, ema
    ema = ckpt.get("model_ema")
    return sd, (dict(ema) if isinstance(ema, dict) else None)


def from_checkpoint(ckpt: dict, name: str) -> tuple[Config, Data2Vec1, dict | None]:
    """(config, student with the checkpoint's weights, the EMA teacher's state or None) of a
    data2vec 1 checkpoint of family `name` (see `family`)."""
    sd, ema = _student(ckpt, name)
    heads = sorted(k for k in sd if "classification_heads." in k or k.startswith(("head.", "fc_norm.")))
    if heads:
        raise ReferenceCheckpointError(f"{name} checkpoint with a fine-tuned head ({heads[0]}): import the pretraining "
                                       "checkpoint (the one the fine-tuning started from)")
    modality = FAMILIES[name]
    try:
        cfg = (_audio_config(model_cfg(ckpt), sd) if modality == "audio" else
               _text_config(model_cfg(ckpt), sd) if modality == "text" else
               _vision_config(vars(ckpt["args"]) if isinstance(ckpt.get("args"), Namespace) else {}, sd))
        cfg = cfg.validate()
    except (KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, D2VError):
            raise
        raise ReferenceCheckpointError(f"{name} checkpoint lacks or mistypes {one_line(e)[:160]}: not a complete "
                                       f"{name} pretraining checkpoint") from None
    student = Data2Vec1(cfg.model)
    state = from_reference(modality, {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()})
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ReferenceCheckpointError(f"the {name} weights do not fit the model its config describes (missing "
                                       f"{missing[:3]}, unexpected {unexpected[:3]})")
    teacher = None
    if ema is not None:
        ours = ReplicatedTeacher(student.encoder, cfg.model).state_dict()
        mapped = from_reference(modality, {k: v.float() for k, v in ema.items() if torch.is_floating_point(v)},
                                teacher=True)
        lacking = sorted(set(ours) - set(mapped))
        if lacking:
            raise ReferenceCheckpointError(f"the {name} EMA teacher lacks {lacking[:3]}: not the EMA of this model")
        teacher = {k: mapped[k] for k in ours}       # what the reference copies from the student is not kept
    return cfg, student, teacher
