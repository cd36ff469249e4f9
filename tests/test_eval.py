"""Evaluation: load_encoder from every source against the training model, the kNN/linear probes,
`d2v probe` on every modality's labelled shards, the pretraining kNN monitor (logged, bit-exact resume),
and the one-line refusals (no labels, another modality)."""
import json
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

import d2v_scale
from d2v_scale.config import ConfigError
from d2v_scale.d2v import Data2Vec
from d2v_scale.data import DataError
from d2v_scale.evaluate import accuracy, knn_scores, linear_probe, probe
from d2v_scale.export import export_run, write_weights
from d2v_scale.fairseq import from_fairseq
from d2v_scale.presets import get_preset
from d2v_scale.teacher import make_targets
from helpers import BIN, ROOT, ZERO2_ARGS, child_env, d2v_here, losses, run_d2v, run_group

ASSETS = ROOT / "tests" / "assets"
PROBE = ROOT / "tests" / "probes" / "encoder_probe.py"


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def random_encoder(path, preset="vit_base_patch16_debug", vocab_size=None):
    """The encoder a pretraining run starts from, as a weights file (seed 1, like build_engine)."""
    cfg = get_preset(preset)
    if vocab_size:
        cfg.model.text.vocab_size = vocab_size
    torch.manual_seed(cfg.run.seed)
    write_weights(path, Data2Vec(cfg.model).encoder.state_dict(), cfg.to_dict(), "encoder")
    return path


def shard(*args):
    res = subprocess.run([str(BIN / "d2v-shard"), *map(str, args)], env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


# -- the probes on known answers ------------------------------------------------------------------

def test_knn_votes_leave_one_out_and_linear_probe():
    g = torch.Generator().manual_seed(0)
    bank, labels, queries = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g), torch.randn(7, 8, generator=g)
    scores = knn_scores(bank, labels, queries, 3, k=5, temperature=0.1)
    b, q = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(queries, dim=1)
    for i in range(7):                                   # dinov2's rule written out: softmax(top-k sim / T) votes
        sim = b @ q[i]
        top = sim.topk(5)
        w = (top.values / 0.1).softmax(0)
        want = torch.zeros(3).index_add_(0, labels[top.indices], w)
        assert torch.allclose(scores[i], want, atol=1e-6)
    # leave-one-out: a sample is not its own neighbour (duplicates of class 1 vote against the class-0 copy)
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [0.0, 1.0]])
    loo = knn_scores(bank, torch.tensor([0, 1, 1, 2]), bank, 3, k=1, leave_one_out=True)
    assert loo.argmax(1).tolist() == [1, 1, 1, 1]
    assert accuracy(torch.eye(3), torch.tensor([0, 2, 2])) == {"top1": pytest.approx(200 / 3), "top5": 100.0}

    mu = torch.randn(4, 16, generator=g) * 3                       # separable classes: the probe finds them
    y, yv = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (100,), generator=g)
    x, xv = mu[y] + torch.randn(400, 16, generator=g), mu[yv] + torch.randn(100, 16, generator=g)
    state = torch.get_rng_state()
    first = linear_probe(x, y, xv, 4, epochs=20)
    assert torch.equal(state, torch.get_rng_state())               # seeded, the global RNG left alone
    assert torch.equal(first, linear_probe(x, y, xv, 4, epochs=20))
    assert accuracy(first, yv)["top1"] > 95


# -- load_encoder ------------------------------------------------------------------------------------

def test_load_encoder_reads_fairseq_checkpoints_exactly(tmp_path):
    """The golden fairseq checkpoint: the student's features are fairseq's model's, and the teacher's
    layer outputs rebuild the targets the real fairseq code computed (1e-5)."""
    g = torch.load(ASSETS / "image_tiny.pt", weights_only=True)
    ckpt = {"model": {**g["student_state_dict"], "_ema": g["teacher_state_dict"]},
            "cfg": {"model": json.loads(g["config"])}}
    torch.save(ckpt, tmp_path / "checkpoint_best.pt")
    student = d2v_scale.load_encoder(tmp_path / "checkpoint_best.pt")
    teacher = d2v_scale.load_encoder(tmp_path / "checkpoint_best.pt", teacher=True)
    x = g["inputs"]                                                    # (2, 3, 56, 56)
    with torch.no_grad():
        ref, _ = from_fairseq(ckpt).student.encoder.extract_features(x)
        tokens = student.forward_features(x)
        assert tokens.shape == (2, 1 + 196, 64) and rel(tokens, ref) < 1e-6
        assert torch.equal(student.pool(tokens, "cls"), tokens[:, 0])
        assert torch.allclose(student.encode(x), tokens[:, 1:].mean(1))
        feats, _ = teacher.encoder.local_features(x)
        _, layers = teacher.encoder(feats, None, 1, None, return_layers=True)
        assert rel(make_targets(layers, teacher.cfg.model), g["forward"]["targets_y"]) < 1e-5


@pytest.mark.timeout(300)
def test_load_encoder_on_a_zero3_run_and_its_export_matches_the_training_engines(image_shards, tmp_path):
    """2 ranks, ZeRO-3, sharded teacher: features of the live engines (probe script) equal those of
    load_encoder on the run directory and on its `d2v export` file, student and teacher (1e-6); the kNN
    monitor runs on both ranks, agrees across them and leaves RNG, weights and modes as they were."""
    run, ref = tmp_path / "run", tmp_path / "ref.pt"
    res = run_group([BIN / "deepspeed", "--num_accelerators", "2", "--no_local_rank", "--master_port",
                     str(__import__("d2v_scale.dist", fromlist=["x"]).free_port()), PROBE, run, image_shards, ref],
                    timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = torch.load(ref, weights_only=True)
    export_run(run, tmp_path / "enc.safetensors", teacher=True)
    with torch.no_grad():
        for source in (run, tmp_path / "enc.safetensors"):
            student, teacher = d2v_scale.load_encoder(source), d2v_scale.load_encoder(source, teacher=True)
            assert rel(student(r["probe"]), r["student"]) < 1e-6, source
            assert rel(teacher(r["probe"]), r["teacher"]) < 1e-6, source
            assert rel(student(r["probe"]), r["teacher"]) > 1e-3           # the teacher is not the student
    record = json.loads(ref.with_suffix(".json").read_text())
    assert record["rng_kept"] and record["params_kept"] and record["modes_kept"]
    assert record["monitor"][0] == record["monitor"][1] and 0 < record["monitor"][0]["eval/knn_top1_teacher"] <= 100


# -- the kNN monitor in d2v train ------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_knn_monitor_logs_both_encoders_and_keeps_the_resume_bit_exact(image_shards, zero2_run, tmp_path):
    """The suite's 4-step ZeRO-2 run (zero2_run) again with the monitor on, stopped at step 2 and resumed."""
    def args(out, *extra):
        return ["train", "--data", str(image_shards), "--out", str(out), "--optim.max_steps=4", *ZERO2_ARGS, *extra]
    monitor = ["--eval.data", str(image_shards), "--eval.every=2"]
    run_d2v(args(tmp_path / "eval", *monitor, "--run.stop_after=2"))
    out = run_d2v(args(tmp_path / "eval", *monitor, "--resume", "auto")).stdout
    assert "resumed from" in out and "eval step 4: kNN top-1 student" in out
    assert losses(zero2_run) == losses(tmp_path / "eval")                   # the monitor changes nothing
    rows = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/knn_top1_teacher" in r] == [2, 4]
    assert all(0 < r["eval/knn_top1_student"] <= r["eval/knn_top5_student"] for r in rows if "eval/knn_top1_student" in r)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(tmp_path / "eval" / "tb"))
    ev.Reload()
    assert [s.step for s in ev.Scalars("eval/knn_top1_student")] == [2, 4]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["knn_top1_teacher"] > 0


# -- d2v probe ---------------------------------------------------------------------------------------

def test_probe_command_prints_knn_and_linear_for_mean_and_cls(image_shards, tmp_path):
    enc = random_encoder(tmp_path / "random.safetensors")
    out = run_d2v(["probe", "--init", str(enc), "--train", str(image_shards), "--val",
                   str(image_shards / "index.json"), "--epochs", "5", "--num_workers", "1"]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["classes"] == 4 and result["train"] == result["val"] == 96
    for pool in ("mean", "cls"):
        assert set(result["results"][pool]) == {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}
        assert result["results"][pool]["knn_top1"] > 25        # the bank holds the queries themselves


def test_labelled_audio_and_text_shards_can_be_probed(corpus_dir, spm_model, tmp_path):
    """d2v-shard audio|text --labels: every sample carries its class (classes.json beside); a text
    (blocks within one document, padded) and an audio encoder probe on them."""
    docs = sorted(corpus_dir.glob("*.txt"))[:6]
    for i, f in enumerate(docs):
        (tmp_path / "text" / f"kind{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "text" / f"kind{i % 2}" / f.name).write_text(f.read_text()[:1500])
    shard("text", tmp_path / "text", tmp_path / "ts", "--spm", spm_model, "--tokens_per_sample", 64,
          "--labels", "folders", "--workers", 1)
    assert json.loads((tmp_path / "ts" / "classes.json").read_text()) == {"kind0": 0, "kind1": 1}
    (tmp_path / "wav").mkdir()
    rows = []
    for i in range(6):                                      # tones of two pitches, 1-2 s
        t = np.arange(int(16000 * (1 + i / 5))) / 16000
        sf.write(tmp_path / "wav" / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 400 * (i % 2)) * t)).astype(np.float32), 16000)
        rows.append(f"u{i}.wav\t{'high' if i % 2 else 'low'}")
    (tmp_path / "labels.tsv").write_text("\n".join(rows) + "\n")
    shard("audio", tmp_path / "wav", tmp_path / "as", "--labels", tmp_path / "labels.tsv", "--min_seconds", 0.5,
          "--workers", 1)
    index = json.loads((tmp_path / "as" / "index.json").read_text())
    assert index["classes"] == 2 and index["samples"] == 6
    text = random_encoder(tmp_path / "text.safetensors", "text_base_debug", vocab_size=500)
    for init, shards in ((text, tmp_path / "ts"), (random_encoder(tmp_path / "audio.safetensors", "audio_base_debug"),
                                                   tmp_path / "as")):
        result = probe(str(init), str(shards / "index.json"), str(shards / "index.json"), how="knn", num_workers=0)
        assert set(result) == {"mean"} and 0 < result["mean"]["knn_top1"] <= 100


def test_refusals_name_the_problem_and_the_fix(image_dir, image_shards, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(image_dir.rglob("*.png"))[:8]:
        (flat / p.name).write_bytes(p.read_bytes())
    shard("image", flat, tmp_path / "unlabelled", "--maxcount", 4)
    enc = random_encoder(tmp_path / "img.safetensors")
    res = d2v_here(["probe", "--init", str(enc), "--train", str(tmp_path / "unlabelled"), "--val",
                    str(image_shards)])
    assert res.returncode != 0 and res.stdout.strip().splitlines()[-1].startswith("d2v: error: --train")
    assert "no class label" in res.stdout and "d2v-shard image DIR" in res.stdout and "Traceback" not in res.stdout
    with pytest.raises(DataError, match="its index says the shards have no class labels"):
        probe(str(enc), str(tmp_path / "unlabelled" / "index.json"), str(image_shards))
    text = random_encoder(tmp_path / "text.safetensors", "text_base_debug", vocab_size=500)
    with pytest.raises(DataError, match="holds image samples \\(its index says so\\) but the encoder is a text"):
        probe(str(text), str(image_shards), str(image_shards))          # a d2v-shard folder: read through its index
    with pytest.raises(DataError, match="holds image samples \\(its index says so\\) but the encoder is a text"):
        probe(str(text), str(image_shards / "index.json"), str(image_shards))
    with pytest.raises(ConfigError, match="--how"):
        probe(str(enc), str(image_shards), str(image_shards), how="svm")
    with pytest.raises(d2v_scale.export.WeightsError, match="not found"):
        d2v_scale.load_encoder(tmp_path / "missing.safetensors")


def test_demo_scenes_show_their_class_in_every_picture(monkeypatch):
    """The demo's labelled scenes: every shape drawn is of the class's kind and no shape's box overlaps
    another's, so the class is in every picture (the first shape drawn, covered by later ones, made a
    label no model could learn)."""
    import random

    from PIL import ImageDraw

    from d2v_scale.tools import demo_data
    drawn = []

    class Recorder(ImageDraw.ImageDraw):
        def ellipse(self, box, **kw):
            drawn.append(("circle", box))
            super().ellipse(box, **kw)

        def rectangle(self, box, **kw):
            drawn.append(("square", box))
            super().rectangle(box, **kw)

        def polygon(self, points, **kw):
            xs, ys = [x for x, _ in points], [y for _, y in points]
            drawn.append(("triangle" if len(points) == 3 else "star", [min(xs), min(ys), max(xs), max(ys)]))
            super().polygon(points, **kw)

    monkeypatch.setattr(demo_data.ImageDraw, "Draw", Recorder)
    rng = random.Random(0)
    counts = [0] * len(demo_data.SHAPES)
    for _ in range(300):
        drawn.clear()
        _, label = demo_data.draw_scene(rng, 48)
        counts[label] += 1
        assert drawn and all(kind == demo_data.SHAPES[label] for kind, _ in drawn), (label, drawn)
        boxes = [box for _, box in drawn]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert min(counts) > 50, counts
