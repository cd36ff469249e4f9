"""Strict loading of fairseq's real-size key maps (tests/assets/keys_real_sizes.json), on the meta device,
and agreement of our presets with the released configs."""
import json
from pathlib import Path

import pytest
import torch

from d2v_scale.fairseq import config_from_fairseq, from_fairseq
from d2v_scale.presets import get_preset

KEYS = json.loads((Path(__file__).parent / "assets" / "keys_real_sizes.json").read_text())["configs"]
ALL = ["base_images_only_task", "large_images_only_task", "huge_images14_only_task",
       "base_audio_only_task", "large_audio_only_task", "base_text_only_task"]
PRESET_OF = {"base_images_only_task": "vit_base_patch16", "large_images_only_task": "vit_large_patch16",
             "huge_images14_only_task": "vit_huge_patch14", "base_audio_only_task": "audio_base",
             "large_audio_only_task": "audio_large", "base_text_only_task": "text_base"}


def meta_checkpoint(entry):
    model = {k: torch.empty(s, device="meta") for k, s in entry["student"].items()}
    model["_ema"] = {k: torch.empty(s, device="meta") for k, s in entry["_ema"].items()}
    return {"model": model, "cfg": {"model": entry["model_config"]}}


@pytest.mark.parametrize("name", ALL)
def test_strict_load_real_size(name):
    entry = KEYS[name]
    with torch.device("meta"):
        model = from_fairseq(meta_checkpoint(entry))       # strict: every key mapped, every shape equal
    student = sum(p.numel() for p in model.student.parameters())
    assert student == entry["counts"]["student_trainable_params"]
    teacher = sum(p.numel() for p in model.teacher.module.parameters())
    fixed = sum(torch.Size(s).numel() for k, s in entry["_ema"].items() if k.endswith("fixed_positional_encoder.positions"))
    assert teacher + fixed == entry["counts"]["ema_numel"]   # the sin-cos table is a buffer here


@pytest.mark.parametrize("name", ALL)
def test_presets_match_released_configs(name):
    ours = get_preset(PRESET_OF[name])
    theirs = config_from_fairseq(KEYS[name]["model_config"])
    if ours.model.text is not None:          # the vocabulary comes from the data, not the preset
        theirs.model.text.vocab_size = ours.model.text.vocab_size
    assert ours.model == theirs.model
    for field in ("mask_prob", "mask_prob_adjust", "mask_length", "inverse_mask", "clone_batch", "mask_noise_std"):
        assert getattr(ours.mask, field) == getattr(theirs.mask, field), field
    assert ours.teacher == theirs.teacher


def test_unsupported_option_is_named():
    cfg = dict(KEYS["base_images_only_task"]["model_config"], layer_norm_first=True)
    with pytest.raises(ValueError, match="layer_norm_first"):
        config_from_fairseq(cfg)
