"""Tensor names: d2v_scale encoders <-> transformers `Data2Vec{Vision,Audio,Text}Model` (and BEiT's
transformers 5 names, RoBERTa's and the task models' encoder prefixes). Mirrors transformers
`models/data2vec/modeling_data2vec_{vision,audio,text}.py`.

Exact, not approximate: q/k/v are the thirds of our fused `qkv`; RoBERTa's token-type row 0 (the
only one used without token_type_ids) is folded into the position table on the way in and written
as zeros on the way out; the relative position index is computed, never stored.
"""
from __future__ import annotations

import re

import torch

from ..config import Config
from ..models import build_encoder
from ..models.audio import parse_conv_spec
from .configs import HF_CLASSES, HFError, len_blocks

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

# per modality: transformers' block prefix, our block Linear / LayerNorm -> theirs, the q, k, v projections
_BLOCKS = {
    "image": ("encoder.layer", {"norm1": "layernorm_before", "norm2": "layernorm_after",
                                "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                                "mlp.fc2": "output.dense"},
              ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
    "audio": ("encoder.layers", {"attn.proj": "attention.out_proj", "norm1": "layer_norm",
                                 "mlp.fc1": "feed_forward.intermediate_dense", "mlp.fc2": "feed_forward.output_dense",
                                 "norm2": "final_layer_norm"},
              ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    "text": ("encoder.layer", {"attn.proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
                               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "norm2": "output.LayerNorm"},
             ("attention.self.query", "attention.self.key", "attention.self.value")),
}
# BEiT's block tensors that are not a Linear's pair: (ours, theirs) after the block prefixes
_BEIT_BLOCK = [("gamma_1", "lambda_1"), ("gamma_2", "lambda_2"), ("attn.q_bias", "attention.attention.query.bias"),
               ("attn.v_bias", "attention.attention.value.bias"),
               ("attn.rel_pos_bias.relative_position_bias_table",
                "attention.attention.relative_position_bias.relative_position_bias_table")]
TOKEN_TYPES = "embeddings.token_type_embeddings.weight"


def _linear(ours: str, theirs: str) -> list[tuple[str, str]]:
    return [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]


def _stem(cfg: Config) -> list[tuple[str, str]]:
    """The tensors before and after the blocks: (our name, transformers name)."""
    m = cfg.model
    if m.modality == "image":
        return [*_linear("patch_embed.proj", "embeddings.patch_embeddings.projection"),
                ("cls_token", "embeddings.cls_token"), ("mask_token", "embeddings.mask_token"),
                ("pos_embed", "embeddings.position_embeddings"),
                ("rel_pos_bias.relative_position_bias_table",
                 "encoder.relative_position_bias.relative_position_bias_table"), *_linear("norm", "layernorm")]
    if m.modality == "audio":
        P = []
        for j in range(len(parse_conv_spec(m.audio.feature_encoder_spec))):
            for part in ("conv", "layer_norm"):
                P += _linear(f"feature_extractor.conv_layers.{j}.{part}", f"feature_extractor.conv_layers.{j}.{part}")
        P += [*_linear("feature_norm", "feature_projection.layer_norm"),
              *_linear("feature_proj", "feature_projection.projection"), ("mask_emb", "masked_spec_embed")]
        for j in range(m.audio.conv_pos_depth):
            P += _linear(f"pos_conv.{j}.conv", f"encoder.pos_conv_embed.layers.{j}.conv")
        return P + _linear("norm_pre", "encoder.layer_norm")
    return [("embed_tokens.weight", "embeddings.word_embeddings.weight"),
            ("embed_positions.weight", "embeddings.position_embeddings.weight"), *_linear("norm_embed", "embeddings.LayerNorm")]


def pairs(cfg: Config, state_keys) -> list[tuple[str, str]]:
    """Every one-to-one tensor of the encoder: (our name, transformers name); `qkv` is split apart (qkv_names)."""
    m = cfg.model
    prefix, parts, _ = _BLOCKS[m.modality]
    P = _stem(cfg)
    for i in range(len_blocks(m)):
        for ours, theirs in parts.items():
            P += _linear(f"blocks.{i}.{ours}", f"{prefix}.{i}.{theirs}")
        if m.modality == "image":
            P += [(f"blocks.{i}.{ours}", f"{prefix}.{i}.{theirs}") for ours, theirs in _BEIT_BLOCK]
    return [(o, t) for o, t in P if o in state_keys]


def qkv_names(cfg: Config, i: int) -> tuple[str, list[str]]:
    """(our fused qkv prefix, the transformers q, k, v prefixes) of block i."""
    prefix, _, qkv = _BLOCKS[cfg.model.modality]
    return f"blocks.{i}.attn.qkv", [f"{prefix}.{i}.{t}" for t in qkv]


def to_hf_state(cfg: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder state dict -> the transformers model's (fp32, contiguous, no shared storage)."""
    out = {t: state[o] for o, t in pairs(cfg, state.keys())}
    for i in range(len_blocks(cfg.model)):
        ours, theirs = qkv_names(cfg, i)
        w = state[f"{ours}.weight"].chunk(3, dim=0)                                   # 3 x (D, D)
        for t, part in zip(theirs, w):
            out[f"{t}.weight"] = part
        if cfg.model.modality == "image":
            continue                                   # BEiT: q_bias, v_bias in the pairs, no key bias
        for t, part in zip(theirs, state[f"{ours}.bias"].chunk(3)):
            out[f"{t}.bias"] = part
    if cfg.model.modality == "text":
        out[TOKEN_TYPES] = torch.zeros(1, cfg.model.embed_dim)
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def _their_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task model's encoder prefix dropped, BEiT's transformers 5 names as Data2VecVisionModel's."""
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
    return state


def from_hf_state(cfg: Config, hf_state: dict[str, torch.Tensor]) -> tuple[dict, list[str], list[str]]:
    """transformers state dict -> (our encoder state, transformers keys left out, our keys kept at init)."""
    state = _their_names(hf_state)
    ours = build_encoder(cfg.model).state_dict()
    used, out = set(), {}
    for o, t in pairs(cfg, ours.keys()):
        if t in state:
            out[o] = state[t]
            used.add(t)
    for i in range(len_blocks(cfg.model)):
        o, theirs = qkv_names(cfg, i)
        ws = [state.get(f"{t}.weight") for t in theirs]
        if any(w is None for w in ws):
            continue
        out[f"{o}.weight"] = torch.cat(ws)                                            # (3D, D)
        used.update(f"{t}.weight" for t in theirs)
        if cfg.model.modality != "image":
            out[f"{o}.bias"] = torch.cat([state[f"{t}.bias"] for t in theirs])        # (3D,)
            used.update(f"{t}.bias" for t in theirs)
    if cfg.model.modality == "text" and TOKEN_TYPES in state:
        out["embed_positions.weight"] = out["embed_positions.weight"] + state[TOKEN_TYPES][0]
        used.add(TOKEN_TYPES)
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


def head_from_hf(cfg: Config, hc: dict, hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The classification head of a task model as d2v_scale's classifiers name it ({} for none), and
    the transformers names it takes: `...ForImageClassification` with mean pooling -> Classifier
    (`fc_norm` = the pooler's LayerNorm, `head` = `classifier`); `...ForSequenceClassification` ->
    SentenceClassifier (RoBERTa's head)."""
    def find(name):
        hits = [k for k in hf_state if k == name or k.endswith("." + name)]
        return hf_state[hits[0]] if len(hits) == 1 else None

    if cfg.model.modality == "image" and hc.get("use_mean_pooling", True):
        parts = {"fc_norm.weight": "pooler.layernorm.weight", "fc_norm.bias": "pooler.layernorm.bias",
                 "head.weight": "classifier.weight", "head.bias": "classifier.bias"}
    elif cfg.model.modality == "text":
        parts = {f"head.{p}.{w}": f"classifier.{p}.{w}" for p in ("dense", "out_proj") for w in ("weight", "bias")}
    else:
        return {}, set()
    head = {ours: find(theirs) for ours, theirs in parts.items()}
    if any(v is None for v in head.values()):
        return {}, set()
    return {k: v.float() for k, v in head.items()}, set(parts.values())
