"""data2vec 1 maskings against the reference generators' statistics (tests/assets/d2v1), the presets,
and pretraining through the real trainer (2 ranks, ZeRO-3, resume)."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v_scale.d2v1 import masks
from d2v_scale.presets import get_preset
from helpers import losses, rewound, run_d2v

ASSETS = Path(__file__).parent / "assets" / "d2v1"


def stats(name):
    return torch.load(ASSETS / f"{name}_tiny.pt", weights_only=True)["mask_stats"]


def test_block_mask_matches_beit_generator():
    """BEiT's MaskingGenerator((14, 14), 120, 16, 196): same count distribution and the same spatial
    profile (rectangles favour the centre) over 256 images each."""
    ref = stats("image")
    rng = np.random.default_rng(0)
    ours = np.stack([masks.block_mask((14, 14), 120, 16, 196, 0.3, rng) for _ in range(256)])    # (256, 196)
    counts, ref_counts = ours.sum(1), ref["masked_per_image"].numpy()
    assert counts.max() <= 120 and abs(counts.mean() - ref_counts.mean()) < 1.0
    assert abs((counts < 120).mean() - (ref_counts < 120).mean()) < 0.1     # images left under the target
    profile = ours.reshape(256, 14, 14).mean((0, 2))                          # per row of patches
    ref_profile = ref["position_freq"].numpy().reshape(14, 14).mean(1)
    assert np.abs(profile - ref_profile).max() < 0.06
    assert profile[6:8].mean() > profile[[0, 13]].mean() + 0.1               # centre masked more than edges


def test_span_mask_matches_compute_mask_indices():
    """fairseq compute_mask_indices(p 0.65, length 10, min_masks 1, require_same_masks) on 49 frames:
    every row masks the same count, close to the reference's for a batch of 256."""
    ref = stats("audio")["masked_per_row"].numpy()
    raw = masks.span_mask([49] * 256, 49, 0.65, 10, 1, np.random.default_rng(0))
    same = masks.same_count(raw.copy(), np.random.default_rng(0))
    assert len(set(same.sum(1))) == 1 and len(set(ref)) == 1
    assert abs(int(same.sum(1)[0]) - int(ref[0])) <= 4
    assert ((raw & ~same).sum(1) >= 0).all() and not (same & ~raw).any()      # trimming only removes


def test_span_masks_of_a_padded_batch_lie_within_each_rows_real_frames():
    """data2vec_audio passes the frame padding to compute_mask_indices: each row's spans are drawn over
    its own real frames (none in the padding) and `require_same_masks` trims to the row with the fewest
    real masked frames. Rows of 49, 30, 19 and 12 real frames of 49: the 12-frame row draws one span
    (min_masks 1; 0.65 x 12 / 10 < 1) of 10 frames starting in [0, 2), so every row ends with 10."""
    from d2v_scale.masking import AheadMasks, step_masks
    cfg = get_preset("d2v1_audio_base_debug")
    source = torch.randn(4, 16_000)
    pad = torch.zeros(4, 16_000, dtype=torch.bool)
    for i, n in enumerate((16_000, 9920, 6400, 4000)):                       # 49, 30, 19, 12 frames
        pad[i, n:] = True
    real = torch.tensor([49, 30, 19, 12])
    frames = torch.arange(49)[None] >= real[:, None]                          # (4, 49) True = padding
    for step in range(50):
        mask = step_masks(cfg, 4, (49,), step, 0, 0, source, pad).mask        # (4, 49)
        assert mask.shape == (4, 49) and not bool((mask & frames).any())
        assert mask.sum(1).tolist() == [10, 10, 10, 10]
        short = np.flatnonzero(mask[3].numpy())
        assert short[0] in (0, 1) and list(short) == list(range(short[0], short[0] + 10))
    ahead = AheadMasks(cfg, 0, 1)({"source": source, "padding_mask": pad}, 7)   # the loader workers' draw
    assert torch.equal(ahead["mask"], step_masks(cfg, 4, (49,), 7, 0, 0, source, pad).mask)
    # without require_same_masks a row's count depends on its real length alone, padded or not
    rng = np.random.default_rng(0)
    padded = masks.span_mask([30] * 2000, 49, 0.65, 10, 1, rng)
    alone = masks.span_mask([30] * 2000, 30, 0.65, 10, 1, rng)
    assert not padded[:, 30:].any() and abs(padded.sum(1).mean() - alone.sum(1).mean()) < 0.5
    assert abs(padded[:, :30].mean(0) - alone.mean(0)).max() < 0.06            # the same positions favoured
    # fairseq's start range is [0, len - span): spans end by frame len - 2, the last real frame stays visible
    assert padded[:, 28].any() and not padded[:, 29].any()
    with pytest.raises(masks.D2v1MaskError, match="every one of a row"):     # fairseq raises the same
        masks.span_mask([12], 49, 0.99, 10, 8, np.random.default_rng(0))


def test_bert_mask_matches_mask_tokens_dataset():
    """fairseq MaskTokensDataset(p 0.35, mask_multiple_length 4) on the reference's 32-token row."""
    ref = stats("text")
    tokens = torch.load(ASSETS / "text_tiny.pt", weights_only=True)["tokens"][:1].repeat(256, 1)
    code = masks.bert_mask(tokens, 0.35, 4, 0.0, 0.0, 100, 1, np.random.default_rng(0))
    chosen = code == 1
    assert abs(chosen.sum(1).float().mean() - ref["masked_per_row"].float().mean()) < 0.8
    window = lambda f: f.unfold(0, 4, 4).mean(1)                                # noqa: E731  (8 windows)
    assert (window(chosen.float().mean(0)) - window(ref["position_freq"])).abs().max() < 0.08


def test_bert_mask_splits_chosen_tokens_and_never_masks_pads():
    tokens = torch.randint(4, 99, (400, 64))
    tokens[:, 50:] = 1                                                          # padding
    code = masks.bert_mask(tokens, 0.35, 4, 0.1, 0.1, 100, 1, np.random.default_rng(1))
    assert not bool((code[:, 50:] != 0).any())
    mask, rand = (code == 1).sum().item(), (code >= 2).sum().item()
    chosen = 0.35 * 50 * 400
    assert 0.7 * chosen < mask + rand < 1.0 * chosen and 0.06 < rand / (mask + rand) < 0.14
    assert int(code.max()) - 2 < 100


def test_presets_name_their_source():
    for name in ("d2v1_vit_base_patch16", "d2v1_vit_large_patch16", "d2v1_audio_base", "d2v1_audio_large",
                 "d2v1_text_base"):
        c, dbg = get_preset(name), get_preset(name + "_debug")
        assert c.model.algorithm == dbg.model.algorithm == "data2vec" and c.model.d2v1.recipe
        assert (c.model.d2v1.masking, c.model.d2v1.target) == (dbg.model.d2v1.masking, dbg.model.d2v1.target)
    base = get_preset("d2v1_vit_base_patch16")
    assert (base.model.average_top_k_layers, base.model.image.layer_scale_init_value, base.optim.lr) == (6, 1e-4, 2e-3)
    assert base.teacher.ema_end_decay == 0.9998 and base.model.d2v1.loss_beta == 2.0
    text = get_preset("d2v1_text_base")
    assert (text.model.d2v1.head_layers, text.model.d2v1.loss_beta, text.mask.mask_prob) == (2, 4.0, 0.35)


def test_the_knn_monitor_reads_the_data2vec_1_teacher_on_the_students_copied_modules():
    """What the kNN monitor pools for the teacher (`extract_features` with the student lending the modules
    the EMA copies): with the teacher still the student's copy it gives the student encoder's full-input
    tokens in all three modalities (padded speech included); once the teacher's blocks move, its tokens
    move with them (it runs the teacher)."""
    from d2v_scale.d2v1.model import Data2Vec1
    from d2v_scale.teacher import ReplicatedTeacher
    speech_pad = torch.zeros(2, 16_000, dtype=torch.bool)
    speech_pad[1, 9920:] = True
    cases = [("d2v1_vit_base_patch16_debug", torch.randn(2, 3, 32, 32), None),
             ("d2v1_audio_base_debug", torch.randn(2, 16_000), speech_pad),
             ("d2v1_text_base_debug", torch.randint(4, 50, (2, 16)), None)]
    for name, x, pad in cases:
        cfg = get_preset(name)
        if cfg.model.text:
            cfg.model.text.vocab_size = 60
        torch.manual_seed(0)
        model = Data2Vec1(cfg.model).eval()
        teacher = ReplicatedTeacher(model.encoder, cfg.model)
        with torch.no_grad():
            tokens, t_pad = teacher.encoder.extract_features(x, pad, model.encoder)       # (B, E+T, D)
            ref, ref_pad = model.encoder.extract_features(x, pad)
            assert tokens.shape == ref.shape and torch.equal(tokens, ref), name
            assert (t_pad is None) == (ref_pad is None) and (t_pad is None or torch.equal(t_pad, ref_pad))
            teacher.encoder.blocks[-1].mlp.fc2.weight.mul_(2)
            assert not torch.allclose(teacher.encoder.extract_features(x, pad, model.encoder)[0], ref), name


def test_knn_monitor_runs_on_a_data2vec_1_speech_model(tmp_path):
    """The kNN monitor of `--eval.every` on a data2vec 1 speech model (its teacher has no CNN or
    positional convolution of its own) over padded batches of labelled tones: both encoders are
    classified; with the teacher still the student's copy both give the same neighbours."""
    import soundfile as sf
    from helpers import BIN, child_env
    from d2v_scale.d2v1.model import Data2Vec1
    from d2v_scale.dist import Dist
    from d2v_scale.evaluate import KnnMonitor, eval_shards
    from d2v_scale.teacher import ReplicatedTeacher
    (tmp_path / "wav").mkdir()
    rows = []
    for i in range(8):                                       # tones of two pitches, 1-1.7 s: padded batches
        t = np.arange(int(16000 * (1 + i / 10))) / 16000
        sf.write(tmp_path / "wav" / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 400 * (i % 2)) * t)).astype(np.float32),
                 16000)
        rows.append(f"u{i}.wav\t{'high' if i % 2 else 'low'}")
    (tmp_path / "labels.tsv").write_text("\n".join(rows) + "\n")
    res = subprocess.run([str(BIN / "d2v-shard"), "audio", str(tmp_path / "wav"), str(tmp_path / "as"), "--labels",
                          str(tmp_path / "labels.tsv"), "--min_seconds", "0.5", "--workers", "1"],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = get_preset("d2v1_audio_base_debug")
    cfg.eval.batch_size, cfg.eval.num_workers, cfg.eval.k = 4, 0, 3
    torch.manual_seed(0)
    model = Data2Vec1(cfg.model)
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    monitor = KnnMonitor(cfg, Dist(0, 1, 0, torch.device("cpu")), eval_shards(str(tmp_path / "as"), "audio", "--eval.data"))
    out = monitor(model.encoder, teacher, torch.float32)
    assert 0 < out["eval/knn_top1_student"] <= out["eval/knn_top5_student"] == 100
    assert out["eval/knn_top1_teacher"] == out["eval/knn_top1_student"] and model.encoder.training


D2V1_ARGS = ["--preset", "d2v1_vit_base_patch16_debug", "--data.num_workers=1", "--data.batch_size=4",
             "--run.log_every=1", "--optim.warmup_steps=2", "--run.save_every=4"]


@pytest.mark.timeout(900)
def test_a_probes_random_baseline_of_a_data2vec_1_run_is_the_data2vec_1_encoder(tmp_path):
    """`d2v probe --random_init` measures a run against the encoder its pretraining started from: for a
    data2vec 1 run the BEiT / wav2vec 2.0 / RoBERTa encoder at the run's seed (it built data2vec 2.0's)."""
    from d2v_scale.export import write_weights
    from d2v_scale.pretrained import random_weights
    from d2v_scale.student import build_model
    for name in ("d2v1_vit_base_patch16_debug", "d2v1_audio_base_debug"):
        cfg = get_preset(name)
        torch.manual_seed(cfg.run.seed)
        encoder = build_model(cfg).encoder.state_dict()
        write_weights(tmp_path / f"{name}.safetensors", {k: v.add(1) for k, v in encoder.items()}, cfg.to_dict(),
                      "encoder")
        baseline = random_weights(tmp_path / f"{name}.safetensors").encoder
        assert baseline.keys() == encoder.keys() and all(torch.equal(baseline[k], v) for k, v in encoder.items())


def test_check_reads_init_from_against_the_data2vec_1_model(tmp_path):
    """`d2v check` compares --run.init_from with the model the config builds: a whole data2vec 1 model
    (student with its regression head, and teacher) fits, data2vec 2.0 weights of the same size do not."""
    from d2v_scale.config import ConfigError
    from d2v_scale.d2v import Data2Vec
    from d2v_scale.d2v1.model import Data2Vec1
    from d2v_scale.export import write_weights
    from d2v_scale.preflight import check_init_from
    cfg = get_preset("d2v1_vit_base_patch16_debug")
    state = Data2Vec1(cfg.model).state_dict()
    teacher = {f"teacher.{k[len('encoder.'):]}": v.clone() for k, v in state.items() if k.startswith("encoder.")}
    write_weights(tmp_path / "d2v1.safetensors", {**state, **teacher}, cfg.to_dict(), "model")
    cfg.run.init_from = str(tmp_path / "d2v1.safetensors")
    check_init_from(cfg)
    v2 = get_preset("vit_base_patch16_debug")
    write_weights(tmp_path / "d2v2.safetensors", Data2Vec(v2.model).state_dict(), v2.to_dict(), "model")
    cfg.run.init_from = str(tmp_path / "d2v2.safetensors")
    with pytest.raises(ConfigError, match="does not fit the model"):
        check_init_from(cfg)


def test_d2v1_pretrains_on_two_ranks_zero3_and_resumes(image_shards, tmp_path):
    """data2vec 1 through the same trainer: 2 ranks with a ZeRO-3 student and a replicated teacher,
    shards, checkpoints, a falling loss, the kNN monitor on both encoders every 4 steps; a run resumed
    at step 4 (2 ranks, ZeRO-3: the first step after the load records DeepSpeed's parameter trace,
    the second fetches by it) repeats the uninterrupted one bitwise, kNN results included."""
    def args(out, *extra):
        return ["train", "--data", str(image_shards), "--ds_config", "ds_configs/zero3.json", "--out", str(out),
                "--optim.max_steps=8", *D2V1_ARGS, "--eval.data", str(image_shards), "--eval.every=4",
                "--eval.batch_size=16", *extra]
    full = tmp_path / "full"
    out = run_d2v(args(full), nproc=2, timeout=600).stdout
    assert "d2v1_vit_base_patch16_debug" in out and "ZeRO-3" in out and "world 2" in out
    assert json.loads((full / "config.json").read_text())["model"]["algorithm"] == "data2vec"
    assert len(losses(full)) == 8 and losses(full)[-1] < losses(full)[0]
    resumed = run_d2v(args(rewound(full, tmp_path / "split", 4), "--resume", "auto"), nproc=2, timeout=600).stdout
    assert "resumed from" in resumed and "eval step 8: kNN top-1 student" in resumed
    assert losses(full) == losses(tmp_path / "split")

    def evals(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/")}) for r in rows if "eval/knn_top1_teacher" in r]
    assert [step for step, _ in evals(full)] == [4, 8] and evals(full) == evals(tmp_path / "split")
    assert all(0 < e["eval/knn_top1_student"] <= e["eval/knn_top5_student"] for _, e in evals(full))
