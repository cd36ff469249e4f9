import json

import pytest

from d2v_scale.config import ConfigError, apply_overrides, from_json
from d2v_scale.presets import PRESETS, get_preset
from d2v_scale.dsconfig import resolve_ds_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    get_preset(name).validate()


def test_overrides_are_coerced_to_field_types():
    cfg = apply_overrides(get_preset("vit_base_patch16"), {
        "mask.clone_batch": "8", "optim.lr": 1, "run.seed": 3.0, "model.grad_checkpointing": "true",
        "optim.betas": "0.9,0.98", "model.loss_scale": "none", "run.out": 123})
    assert cfg.mask.clone_batch == 8 and isinstance(cfg.optim.lr, float)
    assert cfg.model.grad_checkpointing is True and cfg.optim.betas == (0.9, 0.98)
    assert cfg.model.loss_scale is None and cfg.run.out == "123"


@pytest.mark.parametrize("key,hint", [("mask.clone_bach", "mask.clone_batch"), ("optim.learning_rate", None),
                                      ("teacher.ema_decy", "teacher.ema_decay")])
def test_unknown_key_names_the_closest(key, hint):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        apply_overrides(get_preset("vit_base_patch16"), {key: 1})
    if hint:
        assert hint in str(e.value)


def test_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(get_preset("vit_base_patch16"), {"mask.clone_batch": "many"})
    with pytest.raises(ConfigError, match="unknown preset.*vit_base_patch16"):
        get_preset("vit_base_patch61")


def test_json_round_trip(tmp_path):
    cfg = get_preset("audio_large")
    cfg.to_json(tmp_path / "c.json")
    assert from_json(tmp_path / "c.json") == cfg


def write(tmp_path, ds):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    return str(p)


def test_ds_config_autos_are_filled(tmp_path):
    cfg = get_preset("vit_base_patch16")            # 16 per GPU, global 512
    cfg.run.ds_config = "ds_configs/zero3.json"
    ds = resolve_ds_config(cfg, world=8, cuda=False)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 512 and ds["gradient_clipping"] == 4.0
    assert ds["bf16"]["enabled"] is False           # CPU: fp32
    assert resolve_ds_config(cfg, world=8, cuda=True)["bf16"]["enabled"] in (True, False)


@pytest.mark.parametrize("ds,msg", [
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"train_batch_size": 7}, "train_batch_size 7"),
])
def test_ds_config_errors(tmp_path, ds, msg):
    cfg = get_preset("vit_base_patch16_debug")
    cfg.run.ds_config = write(tmp_path, ds)
    with pytest.raises(ConfigError, match=msg):
        resolve_ds_config(cfg, world=2, cuda=False)


def test_global_batch_must_divide(tmp_path):
    cfg = get_preset("vit_base_patch16")
    cfg.run.ds_config = "ds_configs/zero2.json"
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_ds_config(cfg, world=3, cuda=False)
