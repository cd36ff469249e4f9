"""Equivalence with the real data2vec 1 reference code (tests/assets/d2v1/*_tiny.pt, see its README).

For each modality: load the reference weights into `Data2Vec1` (d2v1/reference_keys.py), copy the
teacher as training does, feed the reference's inputs and masks, and compare the teacher's block
results, the predictions, the loss, the gradients, one optimizer step, one EMA step (tau 0.9) and
the forward after both, to 1e-5 relative (gradients of near-zero elements: 1e-4).
"""
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import d2v1_golden_batch

from d2v_scale.config import AudioConfig, Data2Vec1Config, ImageConfig, ModelConfig, TextConfig
from d2v_scale.d2v1.model import Data2Vec1
from d2v_scale.d2v1.reference_keys import from_reference
from d2v_scale.optim import param_groups
from d2v_scale.teacher import ReplicatedTeacher

ASSETS = Path(__file__).parent / "assets" / "d2v1"


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def model_config(modality: str) -> ModelConfig:
    """The tiny configs the golden files were made with (their `config` entry)."""
    common = dict(modality=modality, algorithm="data2vec", embed_dim=64, depth=3, prenet_depth=0, num_heads=4,
                  average_top_k_layers=2, instance_norm_targets=False)
    if modality == "image":
        return ModelConfig(**common, mlp_ratio=4.0, norm_eps=1e-6, instance_norm_target_layer=False,
                           layer_norm_target_layer=True, layer_norm_targets=True,
                           image=ImageConfig(img_size=56, patch_size=4, layer_scale_init_value=0.1),
                           d2v1=Data2Vec1Config(target="end", loss_beta=2.0, loss_reduction="mean", masking="block"))
    if modality == "audio":
        spec = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32,2,2)] * 2"
        return ModelConfig(**common, mlp_ratio=2.0, norm_eps=1e-5, instance_norm_target_layer=True,
                           layer_norm_targets=False, loss_scale=None,
                           audio=AudioConfig(feature_encoder_spec=spec, conv_pos_width=14, conv_pos_depth=2,
                                             conv_pos_groups=16, use_alibi=False),
                           d2v1=Data2Vec1Config(target="ffn", loss_beta=0.0, masking="span"))
    return ModelConfig(**common, mlp_ratio=2.0, norm_eps=1e-5, instance_norm_target_layer=False,
                       layer_norm_target_layer=True, layer_norm_targets=False, loss_scale=1.0,
                       text=TextConfig(vocab_size=100, max_positions=32, dropout=0.0),
                       d2v1=Data2Vec1Config(target="ffn", loss_beta=4.0, head_layers=2, masking="bert"))


def load(modality: str):
    g = torch.load(ASSETS / f"{modality}_tiny.pt", weights_only=True)
    torch.manual_seed(0)
    model = Data2Vec1(model_config(modality))
    state = from_reference(modality, g["student_state_dict"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    teacher = ReplicatedTeacher(model.encoder, model.cfg)     # the reference's teacher starts as the student
    return (g, model, teacher, *d2v1_golden_batch(modality, g, getattr(model.encoder, "mask_idx", -1)))


@pytest.fixture(params=["image", "audio", "text"])
def golden(request):
    torch.use_deterministic_algorithms(True)
    yield (request.param, *load(request.param))
    torch.use_deterministic_algorithms(False)


def reference_loss(modality: str, out: dict) -> torch.Tensor:
    """The number the reference reports: data2vec_vision the mean, fairseq the sum."""
    return out["loss"] / out["sample_size"] if modality == "image" else out["loss"]


def test_forward_matches_reference(golden):
    modality, g, model, teacher, source, mask = golden
    f = g["forward"]
    model.train()
    out = model(source, mask, teacher)
    assert out["sample_size"] == (f["sample_size"] if "sample_size" in f else f["targets"].shape[0])
    with torch.no_grad():
        feats, pad = model.encoder.local_features(source)
        layers = model.teacher_layers(teacher, source, feats, pad)
    ref_layers = f["teacher_layer_results"] if modality != "text" else f["teacher_fc_results"]
    for mine, ref in zip(layers[-len(ref_layers):], ref_layers):
        assert rel(mine, ref) < 1e-5
    if "targets" in f:
        from d2v_scale.d2v1.targets import make_targets
        assert rel(make_targets(layers, model.cfg)[mask], f["targets"]) < 1e-5
    assert rel(reference_loss(modality, out).detach(), f["loss"]) < 1e-5
    if "target_var" in f:
        assert rel(out["target_var"], f["target_var"]) < 1e-5
        assert rel(out["pred_var"], f["pred_var"]) < 1e-5


def fused_checksums(modality: str, sums: dict) -> dict:
    """The reference's per-tensor [sum, sum of squares] under our names (q, k, v add up to qkv)."""
    out = {}
    for key, value in sums.items():
        m = re.search(r"layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", key)
        if m:
            name = f"encoder.blocks.{m.group(1)}.attn.qkv.{m.group(2)}"
            out[name] = out.get(name, 0) + value
        else:
            out.update({k: value for k in from_reference(modality, {key: torch.zeros(1)})})
    return out


@torch.no_grad()
def fairseq_first_adam_step(groups, lr, betas, eps):
    """fairseq.optim.adam.Adam's first step: eps added to sqrt(v) before the bias correction."""
    b1, b2 = betas
    for group in groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            m, v = (1 - b1) * p.grad, (1 - b2) * p.grad * p.grad
            p.mul_(1 - lr * group["weight_decay"])
            p.sub_(lr * (1 - b2) ** 0.5 / (1 - b1) * m / (v.sqrt() + eps))


def test_backward_step_ema_match_reference(golden):
    modality, g, model, teacher, source, mask = golden
    model.train()
    out = model(source, mask, teacher)
    (out["loss"] / out["sample_size"]).backward()
    named = dict(model.named_parameters())
    ref_grads = from_reference(modality, g["grads"])
    assert set(ref_grads) == {k for k, p in named.items() if p.grad is not None}
    for key, ref in ref_grads.items():
        assert rel(named[key].grad, ref) < 1e-4, key
    assert rel(torch.stack([p.grad.norm() for p in named.values() if p.grad is not None]).norm(), g["grad_norm"]) < 1e-5

    if modality == "image":               # data2vec_vision: torch AdamW, BEiT's no-decay groups, clip 3
        recipe = json.loads(g["recipe"])
        ours = [{"names": sorted(n for n, p in named.items() if any(p is q for q in grp["params"])),
                 "wd": grp["weight_decay"]} for grp in param_groups(model, recipe["weight_decay"])]
        ref = [{"names": sorted(next(iter(from_reference("image", {n: torch.zeros(1)}))) for n in grp["names"]),
                "wd": grp["weight_decay"]} for grp in g["param_groups"]]
        assert sorted(ours, key=str) == sorted(ref, key=str)        # the same parameters decay
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip_grad"])
        opt = torch.optim.AdamW(param_groups(model, recipe["weight_decay"]), lr=recipe["lr"], eps=recipe["opt_eps"])
        opt.step()
    else:                                 # fairseq Adam, weight decay on every parameter
        o = json.loads(g["optimizer"])
        if o["clip_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
        fairseq_first_adam_step(param_groups(model, o["weight_decay"], decay_all=True), o["lr"], o["betas"], o["eps"])
    for key, (s, ss) in fused_checksums(modality, g["student_after_step_checksums"]).items():
        p = model.state_dict()[key].double()
        assert abs(float(p.sum()) - float(s)) <= 1e-5 * float(p.abs().sum()), key
        assert abs(float((p * p).sum()) - float(ss)) <= 1e-5 * abs(float(ss)), key

    teacher.update(model.encoder, 0.9)
    mine = teacher.state_dict()
    if modality == "image":
        ref = {k.removeprefix("encoder."): v for k, v in fused_checksums("image", g["teacher_after_ema_checksums"]).items()
               if k.startswith("encoder.")}
        assert set(ref) == set(mine)
        for key, (s, ss) in ref.items():
            p = mine[key].double()
            assert abs(float(p.sum()) - float(s)) <= 1e-5 * float(p.abs().sum()), key
            assert abs(float((p * p).sum()) - float(ss)) <= 1e-5 * abs(float(ss)), key
    else:
        ref = from_reference(modality, g["teacher_after_ema"], teacher=True)
        student = model.encoder.state_dict()
        for key, value in ref.items():
            if key in mine:               # averaged; 1e-8 absolute: an element whose gradient is ~0 moves by
                err = (mine[key].double() - value.double()).abs().max()   # up to lr in Adam's first step, its
                assert err <= 1e-5 * value.abs().max() + 1e-8, key        # sign set by rounding (x 0.1 here)
            else:                         # copied by the reference's EMA: equal to the student after its step
                assert rel(student[key], value) < 1e-5, key
        assert set(mine) <= set(ref)

    out2 = model(source, mask, teacher)
    if modality == "image":
        pred = model.head(model.encoder(model.encoder.local_features(source)[0], mask=mask)[0][:, 1:][mask])
        assert rel(pred.detach(), g["after"]["pred"]) < 1e-5
    else:
        assert rel(out2["loss"].detach(), g["after"]["loss"]) < 1e-5
