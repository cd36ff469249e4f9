"""transformers data2vec configs <-> d2v_scale configs: `config_from_hf` reads a config.json dict
(`Data2VecVisionConfig`, `Data2VecAudioConfig`, `Data2VecTextConfig`, and `RobertaConfig` / `BeitConfig`,
the same layouts), `hf_config` writes the one of an encoder, `check_maps` names why an encoder has no
exact transformers counterpart. Mirrors transformers `models/data2vec/configuration_data2vec_
{vision,audio,text}.py`.
"""
from __future__ import annotations

from ..config import AudioConfig, Config, ImageConfig, ModelConfig, TextConfig
from ..errors import D2VError, one_line
from ..models.audio import parse_conv_spec

HF_TYPES = {"data2vec-vision": "image", "data2vec-audio": "audio", "data2vec-text": "text",
            "roberta": "text",                                        # RobertaModel: Data2VecTextModel's layout
            "beit": "image"}                                          # BeitModel: Data2VecVisionModel's math
HF_CLASSES = {"image": "Data2VecVisionModel", "audio": "Data2VecAudioModel", "text": "Data2VecTextModel"}


class HFError(D2VError, ValueError):
    """A transformers folder or an encoder that cannot be mapped."""


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
