"""Audio and text students end to end: shards made by d2v-shard straight into S3 (SeaweedFS),
verified, then 2-rank ZeRO-3 training streaming from the bucket, with resume equality."""
import json
import math
import subprocess

import pytest

from helpers import BIN, child_env, losses, rewound, run_d2v

RECIPES = {
    "audio": (["--max_seconds", 3, "--min_seconds", 1, "--maxcount", 5],
              ["--preset", "audio_base_debug", "--data.batch_size=2", "--data.epoch_samples=40"]),
    "text": (["--tokens_per_sample", 64, "--maxcount", 100],
             ["--preset", "text_base_debug", "--data.batch_size=4", "--data.tokens_per_sample=64"]),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("modality", ["audio", "text"])
def test_two_rank_zero3_from_s3_with_resume(modality, s3, speech_dir, corpus_dir, spm_model, tmp_path):
    shard_args, train_extra = RECIPES[modality]
    src = speech_dir if modality == "audio" else corpus_dir
    extra = ["--spm", spm_model] if modality == "text" else []
    prefix = f"s3://d2v-test/{modality}"
    res = subprocess.run([str(BIN / "d2v-shard"), modality, str(src), f"{prefix}/train-%06d.tar", *map(str, shard_args),
                          *map(str, extra), "--workers", "2"], env=child_env(**s3.env()), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(BIN / "d2v-shard"), "verify", f"{prefix}/index.json"], env=child_env(**s3.env()),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().startswith("ok:"), res.stdout + res.stderr

    args = ["train", "--data", f"{prefix}/index.json", "--ds_config", "ds_configs/zero3.json", "--optim.max_steps=8",
            "--optim.warmup_steps=2", "--run.log_every=1", "--run.save_every=4", "--data.num_workers=1", *train_extra]
    env = child_env(**s3.env())
    out = run_d2v(args + ["--out", str(tmp_path / "full")], nproc=2, env=env).stdout
    assert "world 2" in out and "ZeRO-3" in out
    rewound(tmp_path / "full", tmp_path / "split", 4)
    run_d2v(args + ["--out", str(tmp_path / "split"), "--resume", "auto"], nproc=2, env=env)
    full = losses(tmp_path / "full")
    assert full == losses(tmp_path / "split")
    assert len(full) == 8 and full[-1] < full[0]
    last = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/unreadable_shards"] == 0 and last["perf/mfu"] > 0
    if modality == "text":
        assert json.loads((tmp_path / "full" / "config.json").read_text())["model"]["text"]["vocab_size"] == 500
    run_d2v(["export", str(tmp_path / "full"), str(tmp_path / "enc.safetensors")])
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "enc.safetensors"))
    assert ("feature_extractor.conv_layers.0.conv.weight" in keys) == (modality == "audio")
    assert ("embed_tokens.weight" in keys) == (modality == "text")


def test_padded_audio_batches(speech_dir, tmp_path):
    """--data.pad_audio: utterances of different lengths share a batch; padded frames are kept out of
    the loss and of the targets' normalisation, and the padding mask reaches the model."""
    import torch
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.data import AudioCodec
    from d2v_scale.masking import sample_mask
    from d2v_scale.presets import get_preset
    from d2v_scale.teacher import ReplicatedTeacher, make_targets
    cfg = get_preset("audio_base_debug")
    cfg.data.pad_audio = True
    batch = AudioCodec(cfg.data).collate([torch.randn(32000), torch.randn(20000)])
    assert batch["source"].shape == (2, 32000) and batch["padding_mask"][1, 20000:].all()
    torch.manual_seed(0)
    model = Data2Vec(cfg.model, 0.0).eval()
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    T = model.encoder.num_frames(32000)
    mask = sample_mask(cfg.mask, 2 * cfg.mask.clone_batch, (T,), torch.Generator().manual_seed(0))
    out = model(batch["source"], mask, teacher, batch["padding_mask"])
    valid = model.encoder.num_frames(20000)
    M = cfg.mask.clone_batch
    assert out["sample_size"] == int(mask[:M].sum()) + int(mask[M:, :valid].sum())   # padded frames not scored
    assert torch.isfinite(out["loss"])
    layers = [torch.randn(2, T, 64)]
    pad = torch.arange(T)[None] >= torch.tensor([[T], [valid]])
    y = make_targets(layers, cfg.model, pad)
    layers2 = [layers[0].clone()]
    layers2[0][1, valid:] = 1e3                                    # garbage in the padded frames
    y2 = make_targets(layers2, cfg.model, pad)
    assert torch.allclose(y[1, :valid], y2[1, :valid], atol=1e-5)  # does not move the valid targets


@pytest.mark.timeout(300)
def test_pad_audio_trains(speech_dir, tmp_path):
    res = subprocess.run([str(BIN / "d2v-shard"), "audio", str(speech_dir), str(tmp_path / "a"), "--max_seconds", "3",
                          "--maxcount", "10"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run_d2v(["train", "--preset", "audio_base_debug", "--data", str(tmp_path / "a"), "--ds_config", "ds_configs/zero2.json",
             "--out", str(tmp_path / "r"), "--optim.max_steps=4", "--run.log_every=1", "--data.batch_size=3",
             "--data.num_workers=1", "--data.pad_audio=true"])
    assert len(losses(tmp_path / "r")) == 4 and all(math.isfinite(l) for l in losses(tmp_path / "r"))
