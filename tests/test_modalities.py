"""Audio and text students end to end: shards made by d2v-shard straight into S3 (SeaweedFS),
verified, then 2-rank ZeRO-3 training streaming from the bucket, with resume equality."""
import json
import subprocess

import pytest

from conftest import BIN, _env, losses, run_d2v

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
                          *map(str, extra), "--workers", "2"], env=_env(**s3.env()), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(BIN / "d2v-shard"), "verify", f"{prefix}/index.json"], env=_env(**s3.env()),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().startswith("ok:"), res.stdout + res.stderr

    args = ["train", "--data", f"{prefix}/index.json", "--ds_config", "ds_configs/zero3.json", "--optim.max_steps=8",
            "--optim.warmup_steps=2", "--run.log_every=1", "--run.save_every=4", "--data.num_workers=1", *train_extra]
    env = _env(**s3.env())
    out = run_d2v(args + ["--out", str(tmp_path / "full")], nproc=2, env=env).stdout
    assert "world 2" in out and "ZeRO-3" in out
    run_d2v(args + ["--out", str(tmp_path / "split"), "--run.stop_after=4"], nproc=2, env=env)
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
