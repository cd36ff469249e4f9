"""Hugging Face transformers in and out: `Data2VecVisionModel`, `Data2VecAudioModel` and
`Data2VecTextModel` folders (what `save_pretrained` writes: config.json + model.safetensors) to and
from d2v_scale encoders. Key names and math mirror transformers `models/data2vec/modeling_data2vec_
{vision,audio,text}.py`; nothing here imports transformers (reading and writing a folder needs its
JSON and safetensors only; loading the exported folder is transformers' `AutoModel.from_pretrained`).

* `d2v import-hf FOLDER OUT.safetensors`: a data2vec 1 encoder (models/beit.py, wav2vec2.py,
  roberta.py) with its config, for `--run.init_from`, `d2v finetune --init`, `d2v probe --init`;
  `--algorithm data2vec2`: the data2vec 2.0 text encoder (or audio encoder without ALiBi) instead.
  A `RobertaModel` folder reads as `Data2VecTextModel` (the same layout), a `BeitModel` folder as
  `Data2VecVisionModel` (the same math; transformers 5 renamed BEiT's weights, both namings read).
  Task models' folders (`...ForImageClassification`, `...ForCTC`, `...ForMaskedLM`) give their
  encoder; their heads and poolers are left out (named in the summary).
* `d2v export SOURCE OUT_DIR --format hf`: a data2vec 1 encoder, or a data2vec 2.0 encoder where
  one maps exactly (text: RoBERTa-shaped; audio without ALiBi), as the matching transformers class.

Exact, not approximate: q/k/v are the thirds of our fused `qkv`; RoBERTa's token-type row 0 (the
only one used without token_type_ids) is folded into the position table on the way in and written
as zeros on the way out; the relative position index is computed, never stored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import AudioConfig, Config, ImageConfig, ModelConfig, TextConfig
from .errors import D2VError, one_line
from .export import check_writable, write_weights
from .models import build_encoder
from .models.audio import parse_conv_spec
from .pretrained import read_encoder

HF_TYPES = {"data2vec-vision": "image", "data2vec-audio": "audio", "data2vec-text": "text",
            "roberta": "text",                                        # RobertaModel: Data2VecTextModel's layout
            "beit": "image"}                                          # BeitModel: Data2VecVisionModel's math
HF_CLASSES = {"image": "Data2VecVisionModel", "audio": "Data2VecAudioModel", "text": "Data2VecTextModel"}
_PREFIXES = ("data2vec_vision.", "data2vec_audio.", "data2vec_text.", "roberta.", "beit.")   # task models' encoders
# BeitModel's names since transformers 5 -> the Data2VecVisionModel names (older BeitModels used those)
_BEIT_RENAMES = [(r"^shared_position_bias\.", "encoder.relative_position_bias."),
                 (r"^layers\.(\d+)\.attention\.([qkv])_proj\.",
                  lambda m: f"encoder.layer.{m[1]}.attention.attention.{dict(q='query', k='key', v='value')[m[2]]}."),
                 (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
                 (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
                 (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
                 (r"^layers\.(\d+)\.relative_position_bias\.",
                  r"encoder.layer.\1.attention.attention.relative_position_bias."),
                 (r"^layers\.(\d+)\.", r"encoder.layer.\1.")]
_IGNORED = re.compile(r".*(relative_position_index|position_ids|token_type_ids)$")   # computed buffers


class HFError(D2VError, ValueError):
    """A transformers folder or an encoder that cannot be mapped."""


# -- reading a save_pretrained folder -------------------------------------------------------------

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


# -- configs ------------------------------------------------------------------------------------

def _need(hc: dict, key: str, want, what: str) -> None:
    if hc.get(key, want) != want:
        raise HFError(f"{what} has {key}={hc[key]!r}; d2v_scale maps only {key}={want!r}")


def config_from_hf(hc: dict, mask_idx: int = -1, algorithm: str = "data2vec") -> Config:
    """The Config of a transformers data2vec (or RoBERTa) config.json dict: a data2vec 1 encoder, or
    with algorithm="data2vec2" a data2vec 2.0 text encoder or audio encoder without ALiBi."""
    kind = hc.get("model_type")
    if kind not in HF_TYPES:
        raise HFError(f"config.json has model_type={kind!r}; d2v import-hf reads {', '.join(HF_TYPES)}")
    modality, D = HF_TYPES[kind], hc["hidden_size"]
    _need(hc, "hidden_act", "gelu", kind)
    if algorithm not in ("data2vec", "data2vec2"):
        raise HFError(f"--algorithm {algorithm!r}: data2vec (data2vec 1, the default) or data2vec2")
    if algorithm == "data2vec2":
        if modality == "image":
            raise HFError("--algorithm data2vec2: a BEiT encoder has no data2vec 2.0 counterpart (2.0 images use "
                          "post-LN blocks and fixed sin-cos positions); import it as data2vec 1")
        if float(hc["layer_norm_eps"]) != 1e-5 or hc.get("conv_bias"):
            raise HFError(f"--algorithm data2vec2: {kind} with layer_norm_eps={hc['layer_norm_eps']}"
                          f"{', conv_bias=true' if hc.get('conv_bias') else ''} does not fit the data2vec 2.0 "
                          "encoder (LayerNorm epsilon 1e-5, convolutions without bias); import it as data2vec 1")
    common = dict(modality=modality, algorithm=algorithm, embed_dim=D, depth=hc["num_hidden_layers"],
                  prenet_depth=0, num_heads=hc["num_attention_heads"], mlp_ratio=hc["intermediate_size"] / D,
                  norm_eps=float(hc["layer_norm_eps"]), average_top_k_layers=min(8, hc["num_hidden_layers"]))
    if modality == "image":
        shared, per_block = hc.get("use_shared_relative_position_bias", False), hc.get("use_relative_position_bias", False)
        if shared == per_block:
            raise HFError(f"{kind} with use_shared_relative_position_bias={shared} and use_relative_position_bias="
                          f"{per_block}: d2v_scale's BEiT encoder has one of the two (a shared table or one per block)")
        size, patch = hc["image_size"], hc["patch_size"]
        if isinstance(size, (list, tuple)) or isinstance(patch, (list, tuple)):
            raise HFError(f"{kind} with image_size={size}, patch_size={patch}: d2v_scale takes square sizes")
        model = ModelConfig(**common, encoder_dropout=hc.get("hidden_dropout_prob", 0.0),
                            attention_dropout=hc.get("attention_probs_dropout_prob", 0.0),
                            end_drop_path_rate=hc.get("drop_path_rate", 0.0),
                            image=ImageConfig(img_size=size, patch_size=patch, in_chans=hc.get("num_channels", 3),
                                              layer_scale_init_value=float(hc.get("layer_scale_init_value", 0.1)),
                                              shared_rel_pos_bias=bool(shared),
                                              abs_pos_emb=bool(hc.get("use_absolute_position_embeddings", False)),
                                              final_norm=not hc.get("use_mean_pooling", True)))
    elif modality == "audio":
        _need(hc, "feat_extract_activation", "gelu", kind)
        _need(hc, "add_adapter", False, kind)
        k, depth = hc["conv_pos_kernel_size"], hc["num_conv_pos_embeddings"]
        if k < 3:
            raise HFError(f"{kind} with conv_pos_kernel_size={k}: the positional convs need a kernel >= 3")
        spec = "[" + ", ".join(f"({c}, {kk}, {s})" for c, kk, s in zip(hc["conv_dim"], hc["conv_kernel"], hc["conv_stride"])) + "]"
        model = ModelConfig(**common, encoder_dropout=hc.get("hidden_dropout", 0.1),
                            attention_dropout=hc.get("attention_dropout", 0.1),
                            activation_dropout=hc.get("activation_dropout", 0.1),
                            dropout_input=hc.get("feat_proj_dropout", 0.0), layerdrop=hc.get("layerdrop", 0.0),
                            audio=AudioConfig(feature_encoder_spec=spec, conv_pos_width=k * depth, conv_pos_depth=depth,
                                              conv_pos_groups=hc["num_conv_pos_embedding_groups"], use_alibi=False,
                                              conv_bias=bool(hc.get("conv_bias", False))))
    else:
        _need(hc, "position_embedding_type", "absolute", kind)
        _need(hc, "is_decoder", False, kind)
        pad = hc.get("pad_token_id", 1)
        model = ModelConfig(**common, encoder_dropout=hc.get("hidden_dropout_prob", 0.1),
                            attention_dropout=hc.get("attention_probs_dropout_prob", 0.1),
                            text=TextConfig(vocab_size=hc["vocab_size"], max_positions=hc["max_position_embeddings"] - pad - 1,
                                            pad_idx=pad, dropout=hc.get("hidden_dropout_prob", 0.1), mask_idx=mask_idx))
    try:
        return Config(model=model).validate()
    except D2VError as e:
        raise HFError(f"{kind} config does not make a valid d2v_scale encoder: {one_line(e)}") from None


def hf_config(cfg: Config, has_mask_emb: bool) -> dict:
    """The config.json of the transformers class matching `cfg.model` (refusals in `check_maps`)."""
    m = cfg.model
    common = dict(hidden_size=m.embed_dim, num_hidden_layers=len_blocks(m), num_attention_heads=m.num_heads,
                  intermediate_size=int(m.embed_dim * m.mlp_ratio), hidden_act="gelu", layer_norm_eps=m.norm_eps,
                  initializer_range=0.02, architectures=[HF_CLASSES[m.modality]], dtype="float32")
    if m.modality == "image":
        i = m.image
        return dict(common, model_type="data2vec-vision", image_size=i.img_size, patch_size=i.patch_size,
                    num_channels=i.in_chans, use_mask_token=True, use_absolute_position_embeddings=i.abs_pos_emb,
                    use_relative_position_bias=not i.shared_rel_pos_bias,
                    use_shared_relative_position_bias=i.shared_rel_pos_bias,
                    layer_scale_init_value=i.layer_scale_init_value, drop_path_rate=m.end_drop_path_rate,
                    use_mean_pooling=not i.final_norm, hidden_dropout_prob=m.encoder_dropout,
                    attention_probs_dropout_prob=m.attention_dropout)
    if m.modality == "audio":
        a = m.audio
        layers = parse_conv_spec(a.feature_encoder_spec)
        k = max(3, a.conv_pos_width // a.conv_pos_depth)
        return dict(common, model_type="data2vec-audio", conv_dim=[c for c, _, _ in layers],
                    conv_kernel=[kk for _, kk, _ in layers], conv_stride=[s for _, _, s in layers],
                    conv_bias=a.conv_bias, feat_extract_activation="gelu", num_conv_pos_embeddings=a.conv_pos_depth,
                    conv_pos_kernel_size=k, num_conv_pos_embedding_groups=a.conv_pos_groups,
                    hidden_dropout=m.encoder_dropout, attention_dropout=m.attention_dropout,
                    activation_dropout=m.activation_dropout, feat_proj_dropout=m.dropout_input,
                    layerdrop=m.layerdrop, mask_time_prob=0.05 if has_mask_emb else 0.0, mask_feature_prob=0.0,
                    add_adapter=False)
    t = m.text
    return dict(common, model_type="data2vec-text", vocab_size=t.vocab_size,
                max_position_embeddings=t.max_positions + t.pad_idx + 1, type_vocab_size=1,
                pad_token_id=t.pad_idx, bos_token_id=0, eos_token_id=2, position_embedding_type="absolute",
                hidden_dropout_prob=m.encoder_dropout, attention_probs_dropout_prob=m.attention_dropout)


def len_blocks(m: ModelConfig) -> int:
    return m.prenet_depth + m.depth


def check_maps(cfg: Config) -> None:
    """HFError naming why an encoder has no exact transformers counterpart."""
    m = cfg.model
    if m.algorithm == "data2vec":
        return
    if m.modality == "image":
        raise HFError("a data2vec 2.0 image encoder has no transformers class: its blocks are post-LN with fixed 2-D "
                      "sin-cos positions (none on CLS) and an embedding LayerNorm, while Data2VecVisionModel is "
                      "BEiT (pre-LN blocks, relative position bias, layer scale); use `d2v export` (safetensors)")
    if m.modality == "audio" and m.audio.use_alibi:
        raise HFError("this data2vec 2.0 audio encoder uses an ALiBi attention bias with a learned per-head scale "
                      "(model.audio.use_alibi), which Data2VecAudioModel does not have; use `d2v export` (safetensors)")
    if m.norm_eps != 1e-5:
        raise HFError(f"this data2vec 2.0 {m.modality} encoder mixes LayerNorm epsilons (model.norm_eps={m.norm_eps}, "
                      f"1e-5 in its embedding norm) where {HF_CLASSES[m.modality]} has one; use `d2v export` (safetensors)")


# -- key maps: (ours, transformers) ---------------------------------------------------------------

def _pairs(cfg: Config, state_keys) -> list[tuple[str, str]]:
    """Every one-to-one tensor of the encoder: (our name, transformers name); `qkv` is split apart."""
    m = cfg.model
    n = len_blocks(m)
    P: list[tuple[str, str]] = []

    def lin(ours, theirs):
        P.extend([(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")])

    if m.modality == "image":
        lin("patch_embed.proj", "embeddings.patch_embeddings.projection")
        P += [("cls_token", "embeddings.cls_token"), ("mask_token", "embeddings.mask_token"),
              ("pos_embed", "embeddings.position_embeddings"),
              ("rel_pos_bias.relative_position_bias_table", "encoder.relative_position_bias.relative_position_bias_table")]
        lin("norm", "layernorm")
        for i in range(n):
            b, h = f"blocks.{i}", f"encoder.layer.{i}"
            lin(f"{b}.norm1", f"{h}.layernorm_before")
            lin(f"{b}.norm2", f"{h}.layernorm_after")
            lin(f"{b}.attn.proj", f"{h}.attention.output.dense")
            lin(f"{b}.mlp.fc1", f"{h}.intermediate.dense")
            lin(f"{b}.mlp.fc2", f"{h}.output.dense")
            P += [(f"{b}.gamma_1", f"{h}.lambda_1"), (f"{b}.gamma_2", f"{h}.lambda_2"),
                  (f"{b}.attn.q_bias", f"{h}.attention.attention.query.bias"),
                  (f"{b}.attn.v_bias", f"{h}.attention.attention.value.bias"),
                  (f"{b}.attn.rel_pos_bias.relative_position_bias_table",
                   f"{h}.attention.attention.relative_position_bias.relative_position_bias_table")]
    elif m.modality == "audio":
        for j in range(len(parse_conv_spec(m.audio.feature_encoder_spec))):
            lin(f"feature_extractor.conv_layers.{j}.conv", f"feature_extractor.conv_layers.{j}.conv")
            lin(f"feature_extractor.conv_layers.{j}.layer_norm", f"feature_extractor.conv_layers.{j}.layer_norm")
        lin("feature_norm", "feature_projection.layer_norm")
        lin("feature_proj", "feature_projection.projection")
        P.append(("mask_emb", "masked_spec_embed"))
        for j in range(m.audio.conv_pos_depth):
            lin(f"pos_conv.{j}.conv", f"encoder.pos_conv_embed.layers.{j}.conv")
        lin("norm_pre", "encoder.layer_norm")
        for i in range(n):
            b, h = f"blocks.{i}", f"encoder.layers.{i}"
            lin(f"{b}.attn.proj", f"{h}.attention.out_proj")
            lin(f"{b}.norm1", f"{h}.layer_norm")
            lin(f"{b}.mlp.fc1", f"{h}.feed_forward.intermediate_dense")
            lin(f"{b}.mlp.fc2", f"{h}.feed_forward.output_dense")
            lin(f"{b}.norm2", f"{h}.final_layer_norm")
    else:
        P += [("embed_tokens.weight", "embeddings.word_embeddings.weight"),
              ("embed_positions.weight", "embeddings.position_embeddings.weight")]
        lin("norm_embed", "embeddings.LayerNorm")
        for i in range(n):
            b, h = f"blocks.{i}", f"encoder.layer.{i}"
            lin(f"{b}.attn.proj", f"{h}.attention.output.dense")
            lin(f"{b}.norm1", f"{h}.attention.output.LayerNorm")
            lin(f"{b}.mlp.fc1", f"{h}.intermediate.dense")
            lin(f"{b}.mlp.fc2", f"{h}.output.dense")
            lin(f"{b}.norm2", f"{h}.output.LayerNorm")
    return [(o, t) for o, t in P if o in state_keys]


def _qkv_names(cfg: Config, i: int) -> tuple[str, list[str]]:
    """(our fused qkv prefix, the transformers q, k, v prefixes) of block i."""
    m = cfg.model
    if m.modality == "image":
        h = f"encoder.layer.{i}.attention.attention"
        return f"blocks.{i}.attn.qkv", [f"{h}.query", f"{h}.key", f"{h}.value"]
    if m.modality == "audio":
        h = f"encoder.layers.{i}.attention"
        return f"blocks.{i}.attn.qkv", [f"{h}.q_proj", f"{h}.k_proj", f"{h}.v_proj"]
    h = f"encoder.layer.{i}.attention.self"
    return f"blocks.{i}.attn.qkv", [f"{h}.query", f"{h}.key", f"{h}.value"]


def to_hf_state(cfg: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> the transformers model's (fp32, contiguous, no shared storage)."""
    out = {t: state[o] for o, t in _pairs(cfg, state.keys())}
    for i in range(len_blocks(cfg.model)):
        ours, theirs = _qkv_names(cfg, i)
        w = state[f"{ours}.weight"].chunk(3, dim=0)                                   # 3 x (D, D)
        for t, part in zip(theirs, w):
            out[f"{t}.weight"] = part
        if cfg.model.modality == "image":
            continue                                   # BEiT: q_bias, v_bias in the pairs, no key bias
        for t, part in zip(theirs, state[f"{ours}.bias"].chunk(3)):
            out[f"{t}.bias"] = part
    if cfg.model.modality == "text":
        out["embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.model.embed_dim)
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_hf_state(cfg: Config, hf_state: dict[str, torch.Tensor]) -> tuple[dict, list[str], list[str]]:
    """transformers state dict -> (our encoder state, transformers keys left out, our keys kept at init)."""
    state = {}
    for k, v in hf_state.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        for pat, rep in _BEIT_RENAMES:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        state[k] = v
    encoder = build_encoder(cfg.model)
    ours = encoder.state_dict()
    used, out = set(), {}
    for o, t in _pairs(cfg, ours.keys()):
        if t in state:
            out[o] = state[t]
            used.add(t)
    for i in range(len_blocks(cfg.model)):
        o, theirs = _qkv_names(cfg, i)
        ws = [state.get(f"{t}.weight") for t in theirs]
        if any(w is None for w in ws):
            continue
        out[f"{o}.weight"] = torch.cat(ws)                                            # (3D, D)
        used.update(f"{t}.weight" for t in theirs)
        if cfg.model.modality != "image":
            out[f"{o}.bias"] = torch.cat([state[f"{t}.bias"] for t in theirs])        # (3D,)
            used.update(f"{t}.bias" for t in theirs)
    if cfg.model.modality == "text" and "embeddings.token_type_embeddings.weight" in state:
        out["embed_positions.weight"] = out["embed_positions.weight"] + state["embeddings.token_type_embeddings.weight"][0]
        used.add("embeddings.token_type_embeddings.weight")
    left_out = sorted(k for k in state if k not in used and not _IGNORED.match(k))
    initialised = sorted(k for k in ours if k not in out)
    allowed = {"mask_token", "mask_emb"}                                    # fine-tuned models drop them
    if set(initialised) - allowed:
        raise HFError(f"the weights do not fit a {HF_CLASSES[cfg.model.modality]} of this config.json: missing "
                      f"{sorted(set(initialised) - allowed)[:3]}")
    for k in initialised:
        out[k] = ours[k]
    bad = [k for k, v in out.items() if v.shape != ours[k].shape]
    if bad:
        raise HFError(f"{bad[0]} has shape {tuple(out[bad[0]].shape)} where config.json implies {tuple(ours[bad[0]].shape)}")
    return {k: v.float() for k, v in out.items()}, left_out, initialised


def head_from_hf(cfg: Config, hc: dict, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classification head of a task model, as d2v_scale's classifiers name it ({} for none):
    `...ForImageClassification` with mean pooling -> Classifier (`fc_norm` = the pooler's LayerNorm,
    `head` = `classifier`); `...ForSequenceClassification` -> SentenceClassifier (RoBERTa's head)."""
    def find(name):
        hits = [k for k in hf_state if k == name or k.endswith("." + name)]
        return hf_state[hits[0]] if len(hits) == 1 else None

    if cfg.model.modality == "image" and hc.get("use_mean_pooling", True):
        parts = {"fc_norm.weight": "pooler.layernorm.weight", "fc_norm.bias": "pooler.layernorm.bias",
                 "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    elif cfg.model.modality == "text":
        parts = {f"head.{p}.{w}": f"classifier.{p}.{w}" for p in ("dense", "out_proj") for w in ("weight", "bias")}
    else:
        return {}
    head = {ours: find(theirs) for ours, theirs in parts.items()}
    return {k: v.float() for k, v in head.items()} if all(v is not None for v in head.values()) else {}


# -- commands -------------------------------------------------------------------------------------

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
    head = head_from_hf(cfg, hc, hf_state)
    summary = {"out": str(out), "from": hc["model_type"], "modality": cfg.model.modality,
               "algorithm": cfg.model.algorithm}
    if head:                                                               # a fine-tuned classifier: keep its head
        taken = {"pooler.layernorm.weight", "pooler.layernorm.bias", "classifier.weight", "classifier.bias",
                 *(f"classifier.{p}.{w}" for p in ("dense", "out_proj") for w in ("weight", "bias"))}
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
