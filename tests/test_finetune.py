"""Image fine-tuning: fairseq's layer decay and drop path, the mixup/cutmix recipe of the presets, a
`d2v finetune` run through DeepSpeed (validation, best checkpoint, export, bit-exact resume), and the
refusals (another modality, head/label-count mismatch)."""
import json

import numpy as np
import pytest
import torch
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

import d2v_scale
from d2v_scale.config import ConfigError
from d2v_scale.d2v import Data2Vec
from d2v_scale.data import DataError, ImageCodec, Labelled, finetune_transform
from d2v_scale.export import read_info, write_weights
from d2v_scale.tasks.image import build_mixup
from d2v_scale.models import Classifier, build_encoder, finetune_drop_path
from d2v_scale.optim import param_groups_layer_decay, set_lr
from d2v_scale.preflight import finetune_preflight
from d2v_scale.presets import build_config, get_preset
from d2v_scale.dist import free_port
from helpers import BIN, ROOT, child_env, losses, run_d2v, run_group

FT_PRESETS = ["vit_base_patch16_ft", "vit_large_patch16_ft", "vit_huge_patch14_ft"]


def encoder_file(path, preset="vit_base_patch16_debug"):
    cfg = get_preset(preset)
    torch.manual_seed(cfg.run.seed)
    write_weights(path, Data2Vec(cfg.model).encoder.state_dict(), cfg.to_dict(), "encoder")
    return path


@pytest.mark.parametrize("rule", ["fairseq", "beit"])
def test_layer_decay_per_block_follows_the_formula(rule):
    """fairseq mae_image_classification.py: num_layers = blocks + 1, scales = d ** (num_layers - i),
    block i takes scales[i + 1]; everything else scale 1 (fairseq) or, BEiT/MAE, patch embedding and
    CLS scales[0]."""
    cfg = get_preset("vit_base_patch16")                    # 2 prenet + 10 shared blocks, as released
    model = Classifier(build_encoder(cfg.model), cfg.model.embed_dim, 10)
    decay, n = 0.65, len(model.encoder.blocks)
    scales = [decay ** (n + 1 - i) for i in range(n + 2)]
    groups = param_groups_layer_decay(model, 0.05, decay, n, rule)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["encoder", "blocks"]:
            want = scales[int(parts[2]) + 1]                 # block 0: d^12 ... block 11: d^1
        elif rule == "beit" and parts[1] in ("patch_embed", "cls_token"):
            want = scales[0]
        else:
            want = 1.0                                      # norm_pre, fc_norm, head (and patch/CLS for fairseq)
        assert scale_of[id(p)] == pytest.approx(want, rel=1e-12), name
        assert decay_of[id(p)] == (0.0 if p.ndim <= 1 or name.endswith(".bias") or "cls_token" in name else 0.05)
    assert scale_of[id(model.encoder.blocks[0].attn.qkv.weight)] == pytest.approx(0.65 ** 12)
    assert scale_of[id(model.encoder.blocks[11].mlp.fc2.weight)] == pytest.approx(0.65)
    opt = torch.optim.AdamW(groups)
    set_lr(opt, 1e-3)
    assert sorted({round(g["lr"] / 1e-3, 12) for g in opt.param_groups}) == sorted({round(s, 12) for s in scale_of.values()})


def test_drop_path_ramp_is_fairseqs():
    """dpr = linspace(0, rate, depth); prenet linspace(dpr[0], dpr[P-1], P), shared linspace(dpr[P], dpr[-1], depth)."""
    dpr = np.linspace(0, 0.1, 10)
    want = list(np.linspace(dpr[0], dpr[1], 2)) + list(np.linspace(dpr[2], dpr[-1], 10))
    assert finetune_drop_path(10, 2, 0.1) == pytest.approx(want)
    assert finetune_drop_path(24, 0, 0.2) == pytest.approx(list(np.linspace(0, 0.2, 24)))
    enc = build_encoder(get_preset("vit_base_patch16_debug").model)
    enc.set_drop_path(finetune_drop_path(2, 1, 0.1))              # dpr [0, 0.1]: prenet [0], shared [0.1, 0.1]
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.1])


@pytest.mark.parametrize("name", FT_PRESETS)
def test_presets_mix_cutmix_smooth_and_augment(name):
    cfg = get_preset(name)
    mix = build_mixup(cfg.finetune, 1000)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.label_smoothing) == (0.7, 1.0, 0.9, 0.5, 0.1)
    assert cfg.data.batch_size * 16 == cfg.data.global_batch == 512
    np.random.seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, target = build_mixup(cfg.finetune, 4)(x.clone(), y)
    assert torch.allclose(target.sum(1), torch.ones(4)) and (target < 0.95).all()     # soft targets
    assert not torch.equal(mixed, x)
    tf = finetune_transform(224, cfg.finetune).transforms
    assert any(isinstance(t, RandAugment) for t in tf) and any(isinstance(t, RandomErasing) for t in tf)
    assert any(isinstance(t, RandomErasing) and t.probability == 0.25 for t in tf)


def test_refusals(image_shards, tmp_path):
    def plan(**kw):
        cfg, ds = build_config("vit_base_patch16_ft_debug", None, task="image_classification", train=str(image_shards),
                               val=str(image_shards), out=str(tmp_path / "ft"), ds_config="ds_configs/zero2.json", **kw)
        return finetune_preflight(cfg, ds, 1)

    assert plan(init=str(encoder_file(tmp_path / "enc.safetensors"))).task.num_classes == 4
    audio = encoder_file(tmp_path / "audio.safetensors", "audio_base_debug")
    with pytest.raises(ConfigError, match="holds audio weights; --task image_classification fine-tunes image encoders"):
        plan(init=str(audio))
    cfg = get_preset("vit_base_patch16_debug")
    head = Classifier(build_encoder(cfg.model), 64, 3)
    write_weights(tmp_path / "clf.safetensors", head.state_dict(), cfg.to_dict(), "classifier")
    with pytest.raises(ConfigError, match="3-class head and the shards hold 4 classes"):
        plan(init=str(tmp_path / "clf.safetensors"))
    with pytest.raises(ConfigError, match="num_classes=2 but the --train shards hold 4 classes"):
        plan(init=str(tmp_path / "enc.safetensors"), **{"finetune.num_classes": 2})
    labelled = Labelled(ImageCodec(32, (0.2, 1.0)), num_classes=4)        # a label beyond the head stops the stream
    with pytest.raises(DataError, match="a sample has class 4 but the head has 4 classes"):
        labelled.collate([(torch.zeros(3, 32, 32), 1), (torch.zeros(3, 32, 32), 4)])
    with pytest.raises(ConfigError, match="pretraining preset"):
        cfg, ds = build_config("vit_base_patch16", None, task="image_classification", init=str(tmp_path / "enc.safetensors"),
                               train=str(image_shards), val=str(image_shards))
        finetune_preflight(cfg, ds, 1)


@pytest.mark.timeout(300)
def test_finetune_run_validates_keeps_the_best_and_resumes_exactly(image_shards, tmp_path):
    """1 rank, ZeRO-3: validation every epoch (6 steps), the best checkpoint kept from pruning and
    exported (head + encoder), and a run stopped at step 6 and resumed matches an uninterrupted one."""
    enc = encoder_file(tmp_path / "enc.safetensors")

    def args(out, *extra):
        return ["finetune", "--task", "image_classification", "--init", str(enc), "--train", str(image_shards),
                "--val", str(image_shards / "index.json"), "--ds_config", "ds_configs/zero3.json", "--out", str(out),
                "--optim.max_steps=12", "--data.batch_size=8", "--data.epoch_samples=48", "--data.num_workers=1",
                "--run.log_every=1", "--run.save_every=3", "--run.keep_last=1", "--optim.warmup_steps=2", *extra]
    out = run_d2v(args(tmp_path / "full")).stdout
    assert "vit_base_patch16_ft_debug | image_classification" in out and "ZeRO-3" in out and "4 classes" in out
    run_d2v(args(tmp_path / "split", "--run.stop_after=6"))
    # the resume through the one-node launcher: its pre-flight, then the deepspeed launcher (1 rank)
    env = child_env(INIT=str(enc), TRAIN=str(image_shards), VAL=str(image_shards / "index.json"), NPROC="1",
                    DS_CONFIG="ds_configs/zero3.json", OUT=str(tmp_path / "split"), BIN=str(BIN), MASTER_PORT=str(free_port()))
    res = run_group([ROOT / "launcher/finetune_local.sh", *args(tmp_path / "split")[13:]], timeout=200, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed = res.stdout
    assert resumed.startswith("ok:") and "resume from" in resumed and "resumed from" in resumed
    assert "step_00000006" in resumed
    assert losses(tmp_path / "full") == losses(tmp_path / "split")           # mixup, RandAugment, drop path seeded

    full = tmp_path / "full"
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/top1" in r]
    assert [r["step"] for r in val] == [6, 12] and all(0 <= r["val/top1"] <= r["val/top5"] <= 100 for r in val)
    summary = json.loads((full / "summary.json").read_text())
    best = max(val, key=lambda r: r["val/top1"])
    assert summary["best_step"] == best["step"] and summary["val_best_top1"] == best["val/top1"]
    ckpts = full / "checkpoints"
    assert (ckpts / "best").read_text() == f"step_{best['step']:08d}" and (ckpts / f"step_{best['step']:08d}").is_dir()
    assert sorted(p.name for p in ckpts.glob("step_*")) == sorted({f"step_{best['step']:08d}", "step_00000012"})
    info = read_info(full / "best.safetensors")
    assert info["num_classes"] == 4 and info["val_top1"] == best["val/top1"]
    loaded = d2v_scale.load_encoder(full / "best.safetensors")
    assert loaded.head_state["head.weight"].shape == (4, 64)
    assert loaded.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 65, 64)
