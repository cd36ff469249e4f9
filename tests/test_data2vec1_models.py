"""The data2vec 1 encoders (models/beit.py, wav2vec2.py, roberta.py): the mask replaces the masked
tokens outright, the text mask is the `<mask>` id, per-block results, and the config's refusals."""
import pytest
import torch

from d2v_scale.config import AudioConfig, Config, ConfigError, ImageConfig, ModelConfig, TextConfig
from d2v_scale.models import BeitEncoder, RobertaEncoder, Wav2Vec2Encoder, build_encoder

SUBS = {
    "image": ImageConfig(img_size=32, patch_size=8, shared_rel_pos_bias=False, layer_scale_init_value=0.1),
    "audio": AudioConfig(feature_encoder_spec="[(32, 10, 5)] + [(32, 3, 2)] * 2", conv_pos_width=16,
                         conv_pos_depth=2, conv_pos_groups=4, use_alibi=False),
    "text": TextConfig(vocab_size=50, max_positions=20),
}


def tiny(modality: str, **over) -> ModelConfig:
    kw = dict(modality=modality, algorithm="data2vec", embed_dim=32, depth=3, prenet_depth=0, num_heads=4,
              average_top_k_layers=2, norm_eps=1e-5)
    return ModelConfig(**{**kw, modality: SUBS[modality], **over})


def source(modality: str, g: torch.Generator) -> torch.Tensor:
    if modality == "image":
        return torch.randn(2, 3, 32, 32, generator=g)
    if modality == "audio":
        return torch.randn(2, 1600, generator=g)
    return torch.randint(4, 49, (2, 12), generator=g)


@pytest.mark.parametrize("modality,cls", [("image", BeitEncoder), ("audio", Wav2Vec2Encoder), ("text", RobertaEncoder)])
def test_masked_tokens_are_replaced_outright(modality, cls):
    torch.manual_seed(0)
    enc = build_encoder(tiny(modality))
    assert type(enc) is cls
    enc.reset_parameters()
    enc.eval()
    g = torch.Generator().manual_seed(1)
    feats, pad = enc.local_features(source(modality, g))                          # (B, T, D)
    mask = torch.rand(feats.shape[:2], generator=g) < 0.5
    mask[:, 0] = True
    x, layers = enc(feats, mask=mask, return_layers=True)
    other = torch.where(mask[..., None], torch.randn(feats.shape, generator=g), feats)
    x2, _ = enc(other, mask=mask)
    torch.testing.assert_close(x2, x, rtol=0, atol=1e-6)                          # masked content is gone
    x3, _ = enc(other)
    assert (x3 - x).abs().max() > 1e-3                                             # ...and it was seen unmasked
    E = enc.num_extra_tokens
    assert len(layers) == 3 and all(r.out.shape == r.ffn.shape == feats.shape for r in layers)
    if modality != "image":                                                        # post-norm: no final norm
        torch.testing.assert_close(layers[-1].out, x[:, E:], rtol=0, atol=0)
    else:
        torch.testing.assert_close(enc.norm(layers[-1].out), x[:, E:], rtol=0, atol=0)


def test_text_mask_is_the_mask_token_id():
    torch.manual_seed(0)
    enc = build_encoder(tiny("text"))
    enc.reset_parameters()
    enc.eval()
    tokens = torch.randint(4, 49, (2, 12), generator=torch.Generator().manual_seed(2))
    tokens[1, 9:] = 1                                                              # padded tail
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, [2, 5]] = True
    x, _ = enc(*enc.local_features(tokens)[:1], padding_mask=enc.local_features(tokens)[1], mask=mask)
    ids = tokens.masked_fill(mask, enc.mask_idx)
    assert enc.mask_idx == 49
    x_ids, _ = enc.extract_features(ids)
    keep = tokens.ne(1)
    torch.testing.assert_close(x[keep], x_ids[keep], rtol=0, atol=1e-6)


def test_clones_repeat_each_sample_with_its_own_mask():
    torch.manual_seed(0)
    enc = build_encoder(tiny("image"))
    enc.eval()
    feats, _ = enc.local_features(torch.randn(2, 3, 32, 32))
    mask = torch.rand(4, feats.shape[1]) < 0.4
    x, _ = enc(feats, clones=2, mask=mask)                                         # (4, 1+T, D)
    x1, _ = enc(feats[1:], mask=mask[3:])
    torch.testing.assert_close(x[3:], x1, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not ids_keep"):
        enc(feats, ids_keep=torch.zeros(2, 3, dtype=torch.long))


def test_config_refuses_what_data2vec1_lacks():
    with pytest.raises(ConfigError, match="prenet"):
        Config(model=tiny("image", prenet_depth=2)).validate()
    audio = tiny("audio")
    audio.audio = AudioConfig(use_alibi=True)
    with pytest.raises(ConfigError, match="use_alibi"):
        Config(model=audio).validate()
    with pytest.raises(ConfigError, match="algorithm"):
        Config(model=tiny("text", algorithm="data2vec3")).validate()


def test_beit_init_is_data2vec_visions():
    """beit/modeling_cyclical.py: N(0, 0.02) cut at one std, output projections of block i / sqrt(2 (i+1)),
    layer scale at its start value, zero bias tables."""
    torch.manual_seed(0)
    enc = build_encoder(tiny("image", depth=2))
    enc.reset_parameters()
    w = enc.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 and 0.008 < w.std() < 0.013                # truncated at +-1 std
    assert enc.blocks[1].attn.proj.weight.abs().max() <= 0.02 / 2 + 1e-7    # / sqrt(2 * 2)
    assert enc.mask_token.abs().max() <= 0.02 and enc.mask_token.abs().max() > 0
    assert torch.equal(enc.blocks[0].gamma_2, torch.full((32,), 0.1))
    assert not enc.blocks[0].attn.rel_pos_bias.relative_position_bias_table.any()
