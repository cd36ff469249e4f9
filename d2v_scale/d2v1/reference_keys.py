"""State dicts of the data2vec 1 reference code -> `Data2Vec1` names.

data2vec_vision `beit/modeling_cyclical.py` (BEiT names, `lm_head`), fairseq
`examples/data2vec/models/data2vec_audio.py` (wav2vec 2.0 names, separate q/k/v projections,
`final_proj`) and `data2vec_text.py` (`encoder.sentence_encoder.*`, `encoder.regression_head`).
The separate q, k, v projections are fused into one `qkv` (rows q, k, v); the teacher's EMA dicts map
with the same rules (`teacher=True`: keys without the model prefix, as the EMA module holds them).
"""
from __future__ import annotations

import re

import torch

_LAYER = [(r"self_attn\.out_proj\.", "attn.proj."), (r"self_attn_layer_norm\.", "norm1."),
          (r"final_layer_norm\.", "norm2."), (r"fc1\.", "mlp.fc1."), (r"fc2\.", "mlp.fc2.")]

_AUDIO = [(r"^feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
          (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.", r"feature_extractor.conv_layers.\1.layer_norm."),
          (r"^post_extract_proj\.", "feature_proj."), (r"^layer_norm\.", "feature_norm."),
          (r"^pos_conv\.(\d+)\.0\.", r"pos_conv.\1.conv."), (r"^layer_norm_enc\.", "norm_pre.")]

_TEXT = [(r"^layernorm_embedding\.", "norm_embed.")]


def _fuse_qkv(sd: dict, out: dict, prefix: str) -> None:
    """layers.i.self_attn.{q,k,v}_proj -> blocks.i.attn.qkv (weights and biases concatenated q, k, v)."""
    for key in [k for k in sd if re.search(r"layers\.\d+\.self_attn\.q_proj\.(weight|bias)$", k)]:
        i, kind = re.search(r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", key).groups()
        parts = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
        out[f"{prefix}blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)


def _layers(key: str) -> str | None:
    m = re.match(r"^layers\.(\d+)\.(.*)$", key)
    if m is None:
        return key
    rest = m.group(2)
    if re.match(r"self_attn\.[qkv]_proj\.", rest):
        return None                                   # fused by _fuse_qkv
    for pat, rep in _LAYER:
        rest = re.sub("^" + pat, rep, rest)
    return f"blocks.{m.group(1)}.{rest}"


def from_reference(modality: str, sd: dict[str, torch.Tensor], teacher: bool = False) -> dict[str, torch.Tensor]:
    """Reference state dict (student, or with teacher=True the EMA module's) -> Data2Vec1 keys
    (student: `encoder.*` and `head.*`; teacher: the encoder's own keys)."""
    enc = "" if teacher else "encoder."
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not torch.is_floating_point(value) or key.endswith("version"):
            continue                                  # integer buffers are rebuilt, `version` is fairseq's
        k = key
        if modality == "image":
            new = ("head." + k[len("lm_head."):]) if k.startswith("lm_head.") else enc + k
        elif modality == "audio":
            if k.startswith("final_proj."):
                new = "head." + k[len("final_proj."):]
            else:
                k = k[len("encoder."):] if k.startswith("encoder.") else k
                k = "layer_norm_enc." + k[len("layer_norm."):] if (key.startswith("encoder.layer_norm.") or
                                                                  (teacher and k.startswith("layer_norm."))) else k
                for pat, rep in _AUDIO:
                    k = re.sub(pat, rep, k)
                k = _layers(k)
                new = None if k is None else enc + k
        else:
            if k.startswith("encoder.regression_head."):
                new = "head." + k[len("encoder.regression_head."):]
            else:
                k = k[len("encoder.sentence_encoder."):] if k.startswith("encoder.sentence_encoder.") else k
                for pat, rep in _TEXT:
                    k = re.sub(pat, rep, k)
                k = _layers(k)
                new = None if k is None else enc + k
        if new is not None:
            out[new] = value
    inner = {k[len("encoder."):] if k.startswith("encoder.") and modality == "audio" else
             k[len("encoder.sentence_encoder."):] if k.startswith("encoder.sentence_encoder.") else k: v
             for k, v in sd.items()}
    _fuse_qkv(inner, out, enc)
    return out
