import pytest
import torch

from d2v_scale.d2v import Data2Vec
from d2v_scale.presets import get_preset
from d2v_scale.teacher import ReplicatedTeacher, decay_at, make_targets


@pytest.mark.parametrize("preset,quarter,half", [
    ("vit_base_patch16", 0.999848, 0.999895),     # reference 3.3 table
    ("audio_base", 0.999248, 0.999495),
    ("text_base", 0.999923, 0.999945),
    ("vit_huge_patch14", 0.99985, 0.9999),
])
def test_decay_schedule_matches_reference(preset, quarter, half):
    t = get_preset(preset).teacher
    assert decay_at(0, t) == pytest.approx(t.ema_decay)
    assert decay_at(t.ema_anneal_end_step // 4, t) == pytest.approx(quarter, abs=1e-6)
    assert decay_at(t.ema_anneal_end_step // 2, t) == pytest.approx(half, abs=1e-6)
    assert decay_at(t.ema_anneal_end_step, t) == t.ema_end_decay
    assert decay_at(10 ** 9, t) == t.ema_end_decay


def tiny():
    cfg = get_preset("vit_base_patch16_debug")
    torch.manual_seed(0)
    return cfg, Data2Vec(cfg.model)


def test_ema_closed_form_after_k_steps_and_frozen_at_one():
    cfg, model = tiny()
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    students, taus = [], [0.9, 0.8, 0.95]
    for tau in taus:
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        students.append({k: v.detach().clone() for k, v in model.encoder.named_parameters()})
        teacher.update(model.encoder, tau)
    for k, v in teacher.state_dict().items():
        expect = t0[k]
        for tau, s in zip(taus, students):
            expect = tau * expect + (1 - tau) * s[k]
        assert torch.allclose(v, expect, atol=1e-6), k
    before = teacher.state_dict()
    teacher.update(model.encoder, 1.0)                 # tau = 1: the teacher is frozen, no step
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.updates == 3


def test_teacher_has_no_grad_and_is_eval():
    cfg, model = tiny()
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert set(teacher.names) == {n for n, _ in model.encoder.named_parameters()}   # image: whole encoder


def test_make_targets_matches_a_reference_loop():
    cfg, _ = tiny()
    layers = [torch.randn(2, 10, 64) * (i + 1) + i for i in range(3)]
    y = make_targets(layers, cfg.model)
    ref = 0
    for t in layers[-cfg.model.average_top_k_layers:]:
        mu, var = t.mean(1, keepdim=True), t.var(1, unbiased=False, keepdim=True)
        ref = ref + (t - mu) / torch.sqrt(var + 1e-5)                                  # IN over tokens
    ref = ref / cfg.model.average_top_k_layers
    ref = (ref - ref.mean(-1, keepdim=True)) / torch.sqrt(ref.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(y, ref, atol=1e-5)


def test_bf16_teacher_keeps_fp32_accumulators():
    """A bf16 EMA at decay 0.9999 does not move; the fp32 accumulator does."""
    cfg, model = tiny()
    teacher = ReplicatedTeacher(model.encoder, cfg.model, dtype=torch.bfloat16)
    assert all(a.dtype == torch.float32 for a in teacher.fp32)
    start = teacher.fp32[0].clone()
    with torch.no_grad():
        next(model.encoder.parameters()).add_(1.0)
    for _ in range(50):
        teacher.update(model.encoder, 0.9999)
    assert (teacher.fp32[0] - start).abs().max() > 1e-3
