"""Hugging Face transformers in and out (hf.py): randomly initialised small Data2VecVision/Audio/Text
models (configs built here, nothing downloaded) give the same features to 1e-5 as the d2v_scale
encoder imported from their folder, and the exported folder loads with AutoModel.from_pretrained
and gives the d2v_scale encoder's features; the data2vec 2.0 encoders that map export too."""
import json

import pytest
import torch

from d2v_scale.cli import main
from d2v_scale.config import AudioConfig, Config, ImageConfig, ModelConfig, TextConfig
from d2v_scale.export import write_weights
from d2v_scale.hf import HFError, export_hf, import_hf
from d2v_scale.models import build_encoder
from d2v_scale.pretrained import load_encoder

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def perturbed(model, seed: int):
    """Every parameter moved off its init (layer scale, bias tables, norms, mask tokens included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def vision_config(shared: bool, mean_pooling: bool):
    return transformers.Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, use_mask_token=True, use_relative_position_bias=not shared,
        use_shared_relative_position_bias=shared, use_absolute_position_embeddings=not shared,
        layer_scale_init_value=0.1, use_mean_pooling=mean_pooling, layer_norm_eps=1e-6)


def audio_config():
    return transformers.Data2VecAudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=2, conv_pos_kernel_size=4,
        num_conv_pos_embedding_groups=4, mask_time_prob=0.05, conv_bias=True)


def text_config():
    return transformers.Data2VecTextConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=2, pad_token_id=1, layer_norm_eps=1e-5)


def hf_features(model, modality: str, x: torch.Tensor, pad: torch.Tensor | None = None, mask=None):
    """last_hidden_state of a transformers model; pad (B, S) True = padding."""
    with torch.no_grad():
        if modality == "image":
            return model(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        attn = None if pad is None else (~pad).long()
        if modality == "audio":
            return model(input_values=x, attention_mask=attn, mask_time_indices=mask).last_hidden_state
        return model(input_ids=x, attention_mask=attn).last_hidden_state


def inputs(modality: str):
    g = torch.Generator().manual_seed(3)
    if modality == "image":
        return torch.randn(2, 3, 32, 32, generator=g), None
    if modality == "audio":
        x = torch.randn(2, 2000, generator=g)
        pad = torch.zeros(2, 2000, dtype=torch.bool)
        pad[1, 1500:] = True
        return x.masked_fill(pad, 0.0), pad
    x = torch.randint(4, 59, (2, 14), generator=g)
    x[1, 10:] = 1
    return x, x.eq(1)


def valid_tokens(modality: str, ours, pad):
    """Positions compared: every token, less padded frames / pad tokens."""
    if pad is None:
        return torch.ones(ours.shape[:2], dtype=torch.bool)
    if modality == "text":
        return ~pad
    frames = ours.shape[1]
    lengths = ours.new_tensor([1500.0, 2000.0])
    for k, s in [(10, 5), (3, 2), (3, 2)]:
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return torch.arange(frames)[None] < lengths[:, None]


CASES = {
    "image-shared": ("image", lambda: transformers.Data2VecVisionModel(vision_config(True, False))),
    "image-per-block": ("image", lambda: transformers.Data2VecVisionModel(vision_config(False, True))),
    "audio": ("audio", lambda: transformers.Data2VecAudioModel(audio_config())),
    "text": ("text", lambda: transformers.Data2VecTextModel(text_config(), add_pooling_layer=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_features_equal_both_ways(case, tmp_path):
    modality, make = CASES[case]
    torch.manual_seed(0)
    hf = perturbed(make(), 1)
    hf.save_pretrained(tmp_path / "hf")
    x, pad = inputs(modality)
    want = hf_features(hf, modality, x, pad)

    summary = import_hf(tmp_path / "hf", tmp_path / "enc.safetensors")               # transformers -> d2v_scale
    assert summary["modality"] == modality and summary["algorithm"] == "data2vec" and not summary["initialised"]
    enc = load_encoder(tmp_path / "enc.safetensors")
    with torch.no_grad():
        got = enc.forward_features(x, pad)                                            # (B, E+T, D)
    keep = valid_tokens(modality, got, pad)
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=ATOL)

    export_hf(tmp_path / "enc.safetensors", tmp_path / "out")                         # d2v_scale -> transformers
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(hf).__name__
    again = hf_features(back, modality, x, pad)
    torch.testing.assert_close(again[keep], got[keep], rtol=0, atol=ATOL)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_masked_views_equal(modality, tmp_path):
    """The learned mask embedding (BEiT's mask_token, wav2vec 2.0's mask_emb) sits where transformers puts it."""
    torch.manual_seed(0)
    hf = perturbed(CASES["image-shared" if modality == "image" else "audio"][1](), 2)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "enc.safetensors")
    enc = load_encoder(tmp_path / "enc.safetensors").encoder
    x = inputs(modality)[0]
    with torch.no_grad():
        feats, _ = enc.local_features(x)                                              # (B, T, D)
        mask = torch.rand(feats.shape[:2], generator=torch.Generator().manual_seed(4)) < 0.5
        got, _ = enc(feats, mask=mask)
    torch.testing.assert_close(got, hf_features(hf, modality, x, mask=mask), rtol=0, atol=ATOL)


def test_text_mask_id_from_the_tokenizer_and_fresh_encoders_export(tmp_path):
    """A d2v_scale encoder of its own init goes out; the <mask> id comes from tokenizer.json."""
    torch.manual_seed(0)
    hf = perturbed(transformers.Data2VecTextModel(text_config(), add_pooling_layer=False), 5)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 57, "content": "<mask>"}]}))
    import_hf(tmp_path / "hf", tmp_path / "enc.safetensors")
    assert load_encoder(tmp_path / "enc.safetensors").encoder.mask_idx == 57

    m = ModelConfig(modality="image", algorithm="data2vec", embed_dim=32, depth=2, prenet_depth=0, num_heads=4,
                    average_top_k_layers=2, image=ImageConfig(img_size=32, patch_size=8, layer_scale_init_value=0.5))
    enc = build_encoder(m)
    enc.reset_parameters()
    write_weights(tmp_path / "v1.safetensors", enc.state_dict(), Config(model=m).to_dict(), "encoder")
    export_hf(tmp_path / "v1.safetensors", tmp_path / "v1")
    back = transformers.AutoModel.from_pretrained(tmp_path / "v1").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x).last_hidden_state, enc.eval().extract_features(x)[0],
                                   rtol=0, atol=ATOL)


def data2vec2(modality: str, **sub) -> tuple[ModelConfig, torch.nn.Module]:
    subs = {"text": TextConfig(vocab_size=60, max_positions=30),
            "audio": AudioConfig(feature_encoder_spec="[(16, 10, 5)] + [(16, 3, 2)] * 2", conv_pos_width=8,
                                 conv_pos_depth=2, conv_pos_groups=4, **sub),
            "image": ImageConfig(img_size=32, patch_size=8)}
    m = ModelConfig(modality=modality, embed_dim=32, depth=2, prenet_depth=0, num_heads=4, average_top_k_layers=2,
                    norm_eps=1e-5, **{modality: subs[modality]})
    torch.manual_seed(0)
    return m, perturbed(build_encoder(m), 6)


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_data2vec2_encoders_that_map_export_exactly(modality, tmp_path):
    """data2vec 2.0 text (RoBERTa-shaped) and audio without ALiBi are the transformers layouts."""
    m, enc = data2vec2(modality, **({"use_alibi": False} if modality == "audio" else {}))
    write_weights(tmp_path / "v2.safetensors", enc.state_dict(), Config(model=m).to_dict(), "encoder")
    export_hf(tmp_path / "v2.safetensors", tmp_path / "v2")
    back = transformers.AutoModel.from_pretrained(tmp_path / "v2").eval()
    x = torch.randint(4, 59, (2, 14)) if modality == "text" else torch.randn(2, 2000)
    with torch.no_grad():
        want = enc.extract_features(x)[0]
        got = back(input_ids=x).last_hidden_state if modality == "text" else back(input_values=x).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_what_cannot_map_is_refused_in_one_line(tmp_path, capsys):
    for modality, sub, why in [("image", {}, "sin-cos"), ("audio", {"use_alibi": True}, "ALiBi")]:
        m, enc = data2vec2(modality, **sub)
        write_weights(tmp_path / f"{modality}.safetensors", enc.state_dict(), Config(model=m).to_dict(), "encoder")
        with pytest.raises(HFError, match=why):
            export_hf(tmp_path / f"{modality}.safetensors", tmp_path / f"{modality}_hf")
        assert not (tmp_path / f"{modality}_hf").exists()

    hf = transformers.Data2VecTextModel(text_config(), add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "hf")
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "enc.safetensors")])
    before = (tmp_path / "enc.safetensors").read_bytes()
    with pytest.raises(SystemExit) as e:                                              # existing output kept
        main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "enc.safetensors")])
    assert "--overwrite" in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "enc.safetensors").read_bytes() == before
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "enc.safetensors"), "--overwrite"])
    main(["export", str(tmp_path / "enc.safetensors"), str(tmp_path / "out"), "--format", "hf"])
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["export", str(tmp_path / "enc.safetensors"), str(tmp_path / "out"), "--format", "hf"])
    main(["export", str(tmp_path / "enc.safetensors"), str(tmp_path / "out"), "--format", "hf", "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit, match="model_type='bert'"):
        main(["import-hf", str(tmp_path / "bad"), str(tmp_path / "bad.safetensors")])
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "data2vec-text"}))
    with pytest.raises(SystemExit, match="lacks or mistypes 'hidden_size'"):
        main(["import-hf", str(tmp_path / "bad"), str(tmp_path / "bad.safetensors")])
    (tmp_path / "bin").mkdir()                                                       # pytorch_model.bin: weights_only
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert import_hf(tmp_path / "bin", tmp_path / "bin.safetensors")["tensors"] == 28
    torch.save({"w": torch.zeros(1), "obj": HFError("x")}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(SystemExit, match="weights_only=True"):
        main(["import-hf", str(tmp_path / "bin"), str(tmp_path / "bin2.safetensors")])
    assert not (tmp_path / "bin2.safetensors").exists()
    with pytest.raises(SystemExit, match="no config.json"):
        main(["import-hf", str(tmp_path), str(tmp_path / "x.safetensors")])


def test_an_encoder_alone_starts_the_teacher_as_itself(tmp_path):
    """--run.init_from with an encoder file (d2v import-hf, d2v export): the EMA teacher starts as that
    encoder, not as the random init it was copied from before the weights were loaded."""
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.engine import load_init_weights
    from d2v_scale.teacher import ReplicatedTeacher

    hf = perturbed(transformers.Data2VecTextModel(text_config(), add_pooling_layer=False), 7)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "enc.safetensors")
    cfg = load_encoder(tmp_path / "enc.safetensors").cfg
    torch.manual_seed(0)
    model = Data2Vec(cfg.model)
    assert load_init_weights(model, str(tmp_path / "enc.safetensors")) == {}     # no teacher in the file
    teacher = ReplicatedTeacher(model.encoder, cfg.model)    # as build_engine: copied from the loaded student
    imported = load_encoder(tmp_path / "enc.safetensors").encoder.state_dict()
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, imported[name], rtol=0, atol=0)



def test_an_imported_beit_encoder_takes_the_fine_tuning_path(tmp_path):
    """What `d2v finetune` does with --init before DeepSpeed (which is encoder-agnostic): the encoder
    of a fine-tuned-layout Data2VecVisionModel (per-block bias tables, mean pooling), its drop-path
    ramp, a classifier on it, layer-decay groups covering every parameter, and a backward pass."""
    from d2v_scale.models import Classifier
    from d2v_scale.optim import param_groups_layer_decay
    from d2v_scale.pretrained import finetune_encoder, read_encoder

    torch.manual_seed(0)
    hf = transformers.Data2VecVisionModel(vision_config(False, True))
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "enc.safetensors")
    enc = finetune_encoder(read_encoder(tmp_path / "enc.safetensors"), 0.1, 0)
    assert [b.drop_path.drop_prob for b in enc.blocks[1:]] == [0.1]
    model = Classifier(enc, 32, 5).train()
    groups = param_groups_layer_decay(model, 0.05, 0.65, len(enc.blocks), "beit")
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    logits = model(torch.randn(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mask_token" not in n)


@pytest.mark.parametrize("algorithm", ["data2vec", "data2vec2"])
def test_roberta_and_data2vec_folders_import_as_either_text_encoder(algorithm, tmp_path):
    """A RobertaModel folder (data2vec-pytorch's text encoder) and a Data2VecAudioModel folder import as
    data2vec 1 or 2.0 encoders with the same features; a BEiT one has no 2.0 counterpart."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(**{k: v for k, v in text_config().to_dict().items()
                                        if k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                                 "pad_token_id", "layer_norm_eps")})
    for name, hf in [("roberta", transformers.RobertaModel(cfg, add_pooling_layer=False)),
                     ("audio", transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(
                         **{**audio_config().to_dict(), "conv_bias": False})))]:
        hf = perturbed(hf, 8)
        hf.save_pretrained(tmp_path / name)
        summary = import_hf(tmp_path / name, tmp_path / f"{name}.safetensors", algorithm=algorithm)
        assert summary["algorithm"] == algorithm and not summary["initialised"]
        enc = load_encoder(tmp_path / f"{name}.safetensors")
        assert (type(enc.encoder).__name__ in ("TextEncoder", "AudioEncoder")) == (algorithm == "data2vec2")
        modality = "text" if name == "roberta" else "audio"
        x, pad = inputs(modality)
        if modality == "audio" and algorithm == "data2vec2":
            pad = None                          # the 2.0 audio encoder does not zero padded frames (README)
        with torch.no_grad():
            got = enc.forward_features(x, pad if modality == "audio" else None)
            keep = valid_tokens(modality, got, pad)
            torch.testing.assert_close(got[keep], hf_features(hf, modality, x, pad)[keep], rtol=0, atol=ATOL)
    hf = transformers.Data2VecVisionModel(vision_config(True, False))
    hf.save_pretrained(tmp_path / "vision")
    if algorithm == "data2vec2":
        with pytest.raises(HFError, match="no data2vec 2.0 counterpart"):
            import_hf(tmp_path / "vision", tmp_path / "vision.safetensors", algorithm=algorithm)


@pytest.mark.parametrize("shared", [True, False])
def test_beit_folders_import_too(shared, tmp_path):
    """data2vec-pytorch's vision encoder is transformers' BeitModel (renamed weights since transformers 5)."""
    torch.manual_seed(0)
    kw = {k: v for k, v in vision_config(shared, not shared).to_dict().items() if k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
        "use_mask_token", "use_relative_position_bias", "use_shared_relative_position_bias",
        "use_absolute_position_embeddings", "layer_scale_init_value", "use_mean_pooling", "layer_norm_eps")}
    hf = perturbed(transformers.BeitModel(transformers.BeitConfig(**kw), add_pooling_layer=False), 9)
    hf.save_pretrained(tmp_path / "beit")
    summary = import_hf(tmp_path / "beit", tmp_path / "enc.safetensors")
    assert summary["from"] == "beit" and not summary["initialised"] and not summary["left_out"]
    x = inputs("image")[0]
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(4)) < 0.5
    enc = load_encoder(tmp_path / "enc.safetensors").encoder
    with torch.no_grad():
        torch.testing.assert_close(enc(enc.local_features(x)[0], mask=mask)[0],
                                   hf_features(hf, "image", x, mask=mask), rtol=0, atol=ATOL)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_fine_tuned_classifiers_import_with_their_heads(modality, tmp_path):
    """Data2VecVisionForImageClassification (mean pooling) -> Classifier, Data2VecTextForSequenceClassification
    -> SentenceClassifier: the same logits, the file a `d2v finetune --init` classifier."""
    from d2v_scale.models import Classifier, SentenceClassifier
    from d2v_scale.pretrained import read_encoder

    torch.manual_seed(0)
    if modality == "image":
        hf = transformers.Data2VecVisionForImageClassification(
            transformers.Data2VecVisionConfig(**{**vision_config(False, True).to_dict(), "num_labels": 5}))
    else:
        hf = transformers.Data2VecTextForSequenceClassification(
            transformers.Data2VecTextConfig(**{**text_config().to_dict(), "num_labels": 3}))
    hf = perturbed(hf, 10)
    hf.save_pretrained(tmp_path / "hf")
    summary = import_hf(tmp_path / "hf", tmp_path / "clf.safetensors")
    assert not summary["left_out"] and summary["classifier"]["num_classes"] == (5 if modality == "image" else 3)
    w = read_encoder(tmp_path / "clf.safetensors")
    enc = build_encoder(w.cfg.model)
    model = Classifier(enc, 32, 5) if modality == "image" else SentenceClassifier(enc, 32, 3)
    model.load_state_dict({**{f"encoder.{k}": v for k, v in w.encoder.items()}, **w.head})
    x, pad = inputs(modality)
    with torch.no_grad():
        want = hf(pixel_values=x).logits if modality == "image" else hf(input_ids=x, attention_mask=(~pad).long()).logits
        torch.testing.assert_close(model.eval()(x), want, rtol=0, atol=ATOL)
