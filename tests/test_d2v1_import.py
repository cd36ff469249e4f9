"""`d2v import-fairseq` on data2vec 1 checkpoints: fairseq data2vec_audio / data2vec_text
checkpoint_best.pt and data2vec_vision run_cyclical.py checkpoint-799.pth, built here in the
reference's own containers around the real reference weights of tests/assets/d2v1 (see its README):
the imported model gives the reference's features and loss to 1e-5, carries the reference's EMA
teacher, continues pretraining (`--run.init_from`) and fine-tunes (`--init`)."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import d2v1_golden_batch

from d2v_scale.config import from_dict
from d2v_scale.d2v1.model import Data2Vec1
from d2v_scale.d2v1.reference_keys import from_reference
from d2v_scale.errors import D2VError
from d2v_scale.export import read_weights
from d2v_scale.imports import import_checkpoint
from d2v_scale.models.beit import relative_position_index
from d2v_scale.preflight import check_init_from
from d2v_scale.teacher import ReplicatedTeacher

ASSETS = Path(__file__).parent / "assets" / "d2v1"


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def fairseq_container(model_cfg: dict, model: dict) -> dict:
    """What fairseq's `checkpoint_utils.save_checkpoint` writes (hydra era: `cfg` a plain dict)."""
    return {"args": None, "cfg": {"_name": None, "common": {"fp16": True, "seed": 1}, "model": model_cfg,
                                  "task": {"_name": model_cfg["_name"].replace("data2vec_", "") + "_pretraining"}},
            "model": model, "criterion": None,
            "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 400000}],
            "task_state": {}, "extra_state": {"epoch": 12, "previous_training_time": np.float64(1234.5),
                                              "train_iterator": {"epoch": 12, "iterations_in_epoch": 0}},
            "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0]}]}}


def checkpoint(modality: str, g: dict) -> dict:
    """The reference checkpoint of the golden model, in its real container."""
    sd = dict(g["student_state_dict"])
    if modality == "audio":
        cfg = {"_name": "data2vec_audio", **json.loads(g["config"]), "activation_fn": "gelu",
               "layer_norm_first": False, "conv_bias": False, "conv_pos_groups": 16}
        return fairseq_container(cfg, {**sd, "_ema": g["teacher_after_ema"]})
    if modality == "text":
        c = json.loads(g["config"])
        cfg = {"_name": "data2vec_text", "max_positions": c["max_positions"], "head_layers": c["head_layers"],
               "transformer": {"dropout": 0.0, "attention_dropout": 0.0, "activation_fn": "gelu",
                               "layernorm_embedding": True, "no_scale_embedding": True,
                               "encoder": {"embed_dim": c["embed_dim"], "ffn_embed_dim": c["ffn_embed_dim"],
                                           "layers": c["layers"], "attention_heads": c["attention_heads"],
                                           "normalize_before": False, "learned_pos": True}},
               **{k: c[k] for k in ("average_top_k_layers", "layer_norm_target_layer", "loss_scale", "loss_beta",
                                    "ema_decay", "ema_end_decay", "ema_anneal_end_step", "ema_transformer_layers_only")}}
        return fairseq_container(cfg, {**sd, "encoder._ema": g["teacher_after_ema"]})
    # data2vec_vision utils.save_model: the model's state_dict (with BEiT's int64 index buffer), timm
    # ModelEmaV2's (the teacher as the step started: a copy), optimizer, epoch, scaler, the argparse args
    sd["rel_pos_bias.relative_position_index"] = relative_position_index((14, 14))
    r, c = json.loads(g["recipe"]), json.loads(g["config"])
    args = argparse.Namespace(model="beit_base_patch16_224", input_size=c["img_size"], rel_pos_bias=True,
                              abs_pos_emb=False, layer_scale_init_value=c["init_values"], drop_path=0.0,
                              attn_drop_rate=0.0, target_layers=str(r["target_layers"]), l1_beta=r["l1_beta"],
                              layer_results="end", post_target_layer_norm=True, no_target_layer_norm_last=False,
                              num_mask_patches=120, min_mask_patches_per_block=16, max_mask_patches_per_block=None,
                              ema_decay_init=0.999, ema_decay=0.9998, lr=2e-3, epochs=800,
                              window_size=(14, 14), patch_size=(4, 4), output_dir="/checkpoint/d2v/base_800")
    return {"model": sd, "model_ema": {k: v.clone() for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0, 1]}]},
            "epoch": 799, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                     "growth_interval": 2000, "_growth_tracker": 0}, "args": args}


def imported(modality: str, tmp_path: Path):
    g = torch.load(ASSETS / f"{modality}_tiny.pt", weights_only=True)
    name = {"image": "checkpoint-799.pth", "audio": "checkpoint_best.pt", "text": "checkpoint_best.pt"}[modality]
    torch.save(checkpoint(modality, g), tmp_path / name)
    summary = import_checkpoint(tmp_path / name, tmp_path / "d2v1.safetensors")
    return g, summary, tmp_path / "d2v1.safetensors"


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_imported_checkpoint_gives_the_reference_features_and_loss(modality, tmp_path):
    g, summary, path = imported(modality, tmp_path)
    assert summary["modality"] == modality and summary["algorithm"] == "data2vec"
    student, teacher_state, cfg_dict = read_weights(path)
    cfg = from_dict(cfg_dict)
    model = Data2Vec1(cfg.model)
    model.load_state_dict(student)                                 # strict: the whole student is there
    teacher = ReplicatedTeacher(model.encoder, cfg.model)          # the golden forward's teacher: a copy
    source, mask = d2v1_golden_batch(modality, g, getattr(model.encoder, "mask_idx", -1))
    f = g["forward"]
    torch.use_deterministic_algorithms(True)
    try:
        out = model.train()(source, mask, teacher)
        with torch.no_grad():
            feats, pad = model.encoder.local_features(source)
            layers = model.teacher_layers(teacher, source, feats, pad)
    finally:
        torch.use_deterministic_algorithms(False)
    ref_layers = f["teacher_fc_results"] if modality == "text" else f["teacher_layer_results"]
    for mine, ref in zip(layers[-len(ref_layers):], ref_layers):
        assert rel(mine, ref) < 1e-5
    loss = out["loss"] / out["sample_size"] if modality == "image" else out["loss"]
    assert rel(loss.detach(), f["loss"]) < 1e-5

    # `d2v check` reads the file against the model its config builds (speech and text: a teacher
    # without the CNN / embeddings it never runs)
    cfg.run.init_from = str(path)
    check_init_from(cfg)

    # the teacher in the file is the checkpoint's EMA (fairseq: what it tracks; vision: the whole encoder)
    ema = g["teacher_after_ema"] if modality != "image" else g["student_state_dict"]
    ref = from_reference(modality, ema, teacher=True)
    assert set(teacher_state) == set(ReplicatedTeacher(model.encoder, cfg.model).state_dict())
    for k, v in teacher_state.items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)


def test_imported_vision_checkpoint_continues_pretraining_and_fine_tunes(tmp_path):
    """--run.init_from as build_engine reads it (pre-flight, student, teacher = the file's EMA) and a
    training step; --init as `d2v finetune` reads it (encoder, drop-path ramp, classifier, backward)."""
    from d2v_scale.engine import load_init_weights
    from d2v_scale.models import Classifier
    from d2v_scale.pretrained import finetune_encoder, read_encoder

    g, _, path = imported("image", tmp_path)
    cfg = from_dict(read_weights(path)[2])
    assert cfg.model.image.img_size == 56 and cfg.model.average_top_k_layers == 2 and cfg.model.d2v1.loss_beta == 2.0
    assert (cfg.teacher.ema_decay, cfg.teacher.ema_end_decay, cfg.teacher.ema_anneal_end_step) == (0.999, 0.9998, 0)
    cfg.run.init_from = str(path)
    check_init_from(cfg)
    torch.manual_seed(1)
    model = Data2Vec1(cfg.model)
    teacher_state = load_init_weights(model, str(path))
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    teacher.load_state_dict(teacher_state)
    assert rel(model.head.weight.detach(), g["student_state_dict"]["lm_head.weight"]) == 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mask = g["bool_masked_pos"].flatten(1)
    first = model.train()(g["inputs"], mask, teacher)
    (first["loss"] / first["sample_size"]).backward()
    opt.step()
    assert rel((first["loss"] / first["sample_size"]).detach(), g["forward"]["loss"]) < 1e-5
    assert float(model(g["inputs"], mask, teacher)["loss"].detach()) < float(first["loss"].detach())

    enc = finetune_encoder(read_encoder(path), 0.1, 0)
    # the same run saved through DeepSpeed (--enable_deepspeed: `module`, client state beside it)
    ds = checkpoint("image", g)
    torch.save({"module": ds.pop("model"), **ds}, tmp_path / "mp_rank_00_model_states.pt")
    import_checkpoint(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "ds.safetensors")
    for a, b in zip(read_weights(path)[:2], read_weights(tmp_path / "ds.safetensors")[:2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    clf = Classifier(enc, cfg.model.embed_dim, 5).train()
    torch.nn.functional.cross_entropy(clf(g["inputs"]), torch.tensor([0, 1])).backward()
    assert enc.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_load_encoder_reads_the_checkpoint_itself(modality, tmp_path):
    """`d2v finetune --init` / `d2v probe --init` / load_encoder on the reference checkpoint itself: the
    same encoder (student, or the EMA teacher) as through the imported file."""
    from d2v_scale.pretrained import load_encoder

    g, _, path = imported(modality, tmp_path)
    source = g["inputs"] if modality == "audio" else g["tokens"]
    for teacher in (False, True):
        direct = load_encoder(tmp_path / "checkpoint_best.pt", teacher=teacher)
        assert direct.cfg.model.algorithm == "data2vec"
        with torch.no_grad():
            torch.testing.assert_close(direct(source), load_encoder(path, teacher=teacher)(source), rtol=0, atol=0)


def test_refusals_name_the_problem(tmp_path):
    """An existing OUT without --overwrite (kept as it was), a fine-tuned checkpoint, a data2vec 1
    config d2v_scale does not implement, an unreadable file: one line each; nothing written."""
    g = torch.load(ASSETS / "audio_tiny.pt", weights_only=True)
    ckpt = checkpoint("audio", g)
    torch.save(ckpt, tmp_path / "a.pt")
    (tmp_path / "out.safetensors").write_bytes(b"keep")
    with pytest.raises(D2VError, match="already exists: pass --overwrite"):
        import_checkpoint(tmp_path / "a.pt", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep"
    import_checkpoint(tmp_path / "a.pt", tmp_path / "out.safetensors", overwrite=True)
    assert read_weights(tmp_path / "out.safetensors")[2]["model"]["algorithm"] == "data2vec"

    bad = dict(ckpt, cfg=dict(ckpt["cfg"], model=dict(ckpt["cfg"]["model"], layer_norm_first=True)))
    torch.save(bad, tmp_path / "large_lv.pt")
    with pytest.raises(D2VError, match="layer_norm_first=True"):
        import_checkpoint(tmp_path / "large_lv.pt", tmp_path / "b.safetensors")
    t = checkpoint("text", torch.load(ASSETS / "text_tiny.pt", weights_only=True))
    t["model"]["classification_heads.sst2.out_proj.weight"] = torch.zeros(2, 64)
    torch.save(t, tmp_path / "ft.pt")
    with pytest.raises(D2VError, match="fine-tuned head"):
        import_checkpoint(tmp_path / "ft.pt", tmp_path / "c.safetensors")
    v = checkpoint("image", torch.load(ASSETS / "image_tiny.pt", weights_only=True))
    del v["model"]["rel_pos_bias.relative_position_bias_table"], v["model"]["rel_pos_bias.relative_position_index"]
    torch.save(v, tmp_path / "checkpoint-799.pth")
    with pytest.raises(D2VError, match="without the shared relative position bias"):
        import_checkpoint(tmp_path / "checkpoint-799.pth", tmp_path / "e.safetensors")
    ft = {"module": {k: v for k, v in checkpoint("image", torch.load(ASSETS / "image_tiny.pt", weights_only=True))[
        "model"].items() if not k.startswith("lm_head.")}, "epoch": 99, "ds_version": "0.5.8"}
    ft["module"].update({"fc_norm.weight": torch.ones(64), "head.weight": torch.zeros(1000, 64)})
    torch.save(ft, tmp_path / "mp_rank_00_model_states.pt")           # the released fine-tuned ViT-B
    with pytest.raises(D2VError, match="data2vec_vision checkpoint with a fine-tuned head"):
        import_checkpoint(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "f.safetensors")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(D2VError, match="is not a data2vec checkpoint: expected"):
        import_checkpoint(tmp_path / "other.pth", tmp_path / "g.safetensors")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "a.pt").read_bytes()[:1000])
    with pytest.raises(D2VError, match="not a torch checkpoint or is truncated"):
        import_checkpoint(tmp_path / "trunc.pth", tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == ["out.safetensors"]


def test_check_reads_a_data2vec_2_speech_import_whose_teacher_has_no_cnn(tmp_path):
    """The fairseq data2vec 2.0 speech teacher never runs the CNN (ema_local_encoder=False): the
    imported file has none, and `d2v check` does not ask for one."""
    g = torch.load(Path(__file__).parent / "assets" / "audio_tiny.pt", weights_only=True)
    torch.save({"model": {**g["student_state_dict"], "_ema": g["teacher_state_dict"]},
                "cfg": {"model": json.loads(g["config"])}}, tmp_path / "checkpoint_best.pt")
    import_checkpoint(tmp_path / "checkpoint_best.pt", tmp_path / "w.safetensors")
    cfg = from_dict(read_weights(tmp_path / "w.safetensors")[2])
    cfg.run.init_from = str(tmp_path / "w.safetensors")
    check_init_from(cfg)
