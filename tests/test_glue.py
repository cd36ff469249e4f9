"""Text fine-tuning (`--task text_classification`): `d2v-shard glue` on GLUE layouts (RoBERTa's pair
joining, CoLA's headerless files, the one-line refusals), the GLUE metrics on known answers, the
regression path (STS-B), the fairseq golden text checkpoint inside the sentence classifier, and a
real run: a debug text encoder pretrained with `d2v train`, fine-tuned to tell which license a passage
of /usr/share/common-licenses comes from (validation, best export, exact resume, against random init)."""
import io
import json
import random
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import d2v_scale
from d2v_scale.d2v import Data2Vec
from d2v_scale.data import DataError, SentenceCodec
from d2v_scale.dist import Dist
from d2v_scale.evaluate import EvalStream
from d2v_scale.evaluate.probe import probe
from d2v_scale.evaluate.glue_metrics import classification_metrics, matthews_corr, ranks, regression_metrics
from d2v_scale.export import write_weights
from d2v_scale.fairseq import from_fairseq
from d2v_scale.preflight import finetune_preflight
from d2v_scale.presets import GLUE_RECIPES, build_config, finetune_preset_for, get_preset
from d2v_scale.pretrained import read_config
from d2v_scale.tools.demo_data import sentences
from data_prep.cli import main as d2v_shard
from data_prep.text import train_spm
from helpers import ROOT, losses, rewound, run_d2v

ASSETS = ROOT / "tests" / "assets"
LICENSES = ("Apache-2.0", "GPL-3", "MPL-2.0")
CPU = Dist(0, 1, 0, torch.device("cpu"))


def shard_glue(*args):
    d2v_shard(["glue", *map(str, args)])


def refusal(*args) -> str:
    with pytest.raises(SystemExit) as e:
        shard_glue(*args)
    return str(e.value)


def samples(shard_dir):
    with tarfile.open(Path(shard_dir) / "shard-000000.tar") as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}
    keys = sorted({k.split(".", 1)[0] for k in files})
    return [{k2.split(".", 1)[1]: v for k2, v in files.items() if k2.split(".", 1)[0] == k} for k in keys]


def license_tsvs(out: Path, words: int = 12) -> tuple[Path, Path]:
    """Passages of `words` words from three license texts, as many of each: train.tsv (3/4), dev.tsv."""
    by = {}
    for name in LICENSES:
        for para in re.split(r"\n\s*\n", Path("/usr/share/common-licenses", name).read_text()):
            w = para.split()
            chunks = [" ".join(w[i:i + words]) for i in range(0, len(w), words)]
            by[name] = by.get(name, []) + [c for c in chunks if len(c.split()) >= 6]
    n, rng = min(len(v) for v in by.values()), random.Random(0)
    rows = [(s, name) for name in LICENSES for s in rng.sample(by[name], n)]
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("dev", rows[: len(rows) // 4]), ("train", rows[len(rows) // 4:])):
        (out / f"{split}.tsv").write_text("passage\tlicense\n" + "".join(f"{a}\t{b}\n" for a, b in part))
    return out / "train.tsv", out / "dev.tsv"


# -- metrics --------------------------------------------------------------------------------------

def test_glue_metrics_on_known_answers():
    y, p = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1]), torch.tensor([1, 1, 0, 0, 0, 1, 0, 1])
    tp, tn, fp, fn = 3, 3, 1, 1                                                  # the binary MCC formula
    mcc = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    out = classification_metrics(torch.nn.functional.one_hot(p, 2).float(), y)
    assert out["accuracy"] == 75.0 and out["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    assert out["mcc"] == pytest.approx(100 * mcc) and out["acc_and_f1"] == pytest.approx((75 + out["f1"]) / 2)
    assert matthews_corr(y, y, 2) == pytest.approx(1.0) and matthews_corr(1 - y, y, 2) == pytest.approx(-1.0)
    assert matthews_corr(torch.zeros(8, dtype=torch.long), y, 2) == 0.0            # undefined: sklearn's 0
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]   # ties: average rank
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    r = regression_metrics(a, a ** 3)                                           # monotone, not linear
    assert r["spearman"] == pytest.approx(100.0) and 90 < r["pearson"] < 100
    assert regression_metrics(a, -a)["pearson"] == pytest.approx(-100.0)


# -- d2v-shard glue -----------------------------------------------------------------------------------

def test_shard_glue_joins_pairs_as_roberta_and_refuses_bad_tsvs(corpus_dir, spm_model, tmp_path):
    s = sentences(corpus_dir, 12)
    rte = tmp_path / "RTE" / "train.tsv"
    rte.parent.mkdir()
    rte.write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\t{s[2 * i]}\t{s[2 * i + 1]}\t{'entailment' if i % 2 else 'not_entailment'}\n" for i in range(6)))
    shard_glue(rte, tmp_path / "rte", "--spm", spm_model, "--task", "rte")
    index = json.loads((tmp_path / "rte" / "index.json").read_text())
    assert index["glue"]["labels"] == ["entailment", "not_entailment"] and index["glue"]["pairs"]
    assert json.loads((tmp_path / "rte" / "classes.json").read_text()) == {"entailment": 0, "not_entailment": 1}
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    got = {x["src.txt"].decode(): x for x in samples(tmp_path / "rte")}
    for i in range(6):
        x = got[f"train.tsv:{i + 2}"]
        ids = np.load(io.BytesIO(x["ids.npy"])).tolist()
        assert ids == [0, *sp.encode(s[2 * i]), 2, 2, *sp.encode(s[2 * i + 1]), 2]       # <s> a </s></s> b </s>
        assert int(x["cls"]) == (0 if i % 2 else 1)

    cola = tmp_path / "CoLA" / "train.tsv"                                      # GLUE's CoLA: no header
    cola.parent.mkdir()
    cola.write_text("".join(f"gj04\t{i % 2}\t{'*' if i % 2 == 0 else ''}\t{s[i]}\n" for i in range(6)))
    shard_glue(cola, tmp_path / "cola", "--spm", spm_model, "--task", "cola", "--max_positions", 8)
    index = json.loads((tmp_path / "cola" / "index.json").read_text())
    assert index["samples"] == 6 and not index["glue"]["pairs"] and index["glue"]["metric"] == "mcc"
    assert index["glue"]["longest"] == 8 and index["glue"]["truncated"] == 6          # fairseq TruncateDataset
    first = np.load(io.BytesIO(samples(tmp_path / "cola")[0]["ids.npy"])).tolist()
    assert len(first) == 8 and first[0] == 0

    msg = refusal(rte, tmp_path / "x", "--spm", spm_model, "--sentence1", "premise", "--label", "label")
    assert msg == ("d2v-shard: error: " + str(rte) + " has no column 'premise' (--sentence1); its columns are: index, "
                   "sentence1, sentence2, label; name one of them, or give the GLUE --task whose file this is")
    msg = refusal(rte, tmp_path / "x", "--spm", spm_model, "--task", "stsb", "--label", "label")
    assert "\n" not in msg and f"{rte}:2: the label column 'label' holds 'not_entailment', not a number" in msg
    assert "regression task needs numeric labels" in msg
    assert "has no column 'sentence'" in refusal(rte, tmp_path / "x", "--spm", spm_model, "--task", "sst2")
    assert "label 'not_entailment' in column 'label' is not one of the classes 0, 1" in refusal(
        rte, tmp_path / "x", "--spm", spm_model, "--task", "rte", "--label_names", "0,1")
    shard_glue(rte, tmp_path / "score", "--spm", spm_model, "--sentence1", "sentence1", "--label", "index",
               "--regression")
    glue = json.loads((tmp_path / "score" / "index.json").read_text())["glue"]
    assert glue["regression"] and glue["labels"] is None and glue["metric"] == "pearson_and_spearman"
    assert sorted(float(x["target"]) for x in samples(tmp_path / "score")) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    shard_glue(rte, tmp_path / "again", "--spm", spm_model, "--task", "rte")
    assert "--overwrite" in refusal(rte, tmp_path / "again", "--spm", spm_model, "--task", "rte")


# -- the regression path and the golden checkpoint -----------------------------------------------------

def plan_for(init, train, val, tmp_path, **kw):
    cfg, ds = build_config("text_base_glue_debug", None, task="text_classification", init=str(init), train=str(train),
                           val=str(val), out=str(tmp_path / "ft"), ds_config="ds_configs/zero2.json", **kw)
    return cfg, finetune_preflight(cfg, ds, 1)


def test_regression_loss_metrics_and_the_golden_text_checkpoint(corpus_dir, tmp_path):
    """STS-B layout -> one-output head, MSE loss, Pearson/Spearman picking the best; the fairseq golden
    text checkpoint (vocabulary 100) is the encoder of the sentence classifier, its features unchanged."""
    g = torch.load(ASSETS / "text_tiny.pt", weights_only=True)
    ckpt = {"model": {**g["student_state_dict"], "_ema": g["teacher_state_dict"]},
            "cfg": {"model": json.loads(g["config"])}}
    torch.save(ckpt, tmp_path / "checkpoint_best.pt")
    s = sentences(corpus_dir, 400, seed=1)                  # plain ASCII: few enough characters for 100 pieces
    (tmp_path / "plain.txt").write_text("\n".join(s) + "\n")
    model_file = train_spm(str(tmp_path / "plain.txt"), str(tmp_path / "spm100"), g["vocab_size"])
    sts = tmp_path / "sts.tsv"
    sts.write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n" + "".join(
        f"{i}\tmain\tf\t2012\t{i}\tx\ty\t{s[i]}\t{s[i + 12]}\t{i % 6 * 0.9:.3f}\n" for i in range(12)))
    shard_glue(sts, tmp_path / "sts", "--spm", model_file, "--task", "stsb")

    assert finetune_preset_for(read_config(tmp_path / "checkpoint_best.pt")) == "text_base_glue"   # not by width
    cfg, plan = plan_for(tmp_path / "checkpoint_best.pt", tmp_path / "sts", tmp_path / "sts", tmp_path)
    task = plan.task
    assert task.regression and task.num_classes == 1 and task.metric == "val/pearson_and_spearman"
    model = task.build_model(plan.weights)
    assert model.head.out_proj.out_features == 1
    with torch.no_grad():                                    # the golden encoder inside: fairseq's features
        ref, _ = from_fairseq(ckpt).student.encoder.extract_features(g["inputs"])
        got, _ = model.encoder.extract_features(g["inputs"])
        assert torch.allclose(got, ref, atol=1e-6)
    model.eval()
    batch = next(iter(EvalStream(plan.val, task.val_codec(), 12, 0, 1)))
    assert batch["label"].dtype == torch.float32 and batch["padding_mask"].any()
    loss = task.loss(model, batch, 0, CPU, torch.float32)
    with torch.no_grad():
        pred = model(batch["source"], batch["padding_mask"]).view(-1)
    assert float(loss.detach()) == pytest.approx(float(((pred - batch["label"]) ** 2).mean()), rel=1e-6)
    v = task.validate(model, EvalStream(plan.val, task.val_codec(), 5, 0, 1), CPU, torch.float32, 0)
    with torch.no_grad():                                    # the same batches: the same padding, the same sums
        parts = [(model(b["source"], b["padding_mask"]).view(-1), b["label"])
                 for b in EvalStream(plan.val, task.val_codec(), 5, 0, 1)]
    want = regression_metrics(torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts]))
    assert torch.equal(torch.sort(torch.cat([y for _, y in parts])).values, torch.sort(batch["label"]).values)
    assert v["val/pearson"] == pytest.approx(want["pearson"], rel=1e-6)      # every sample once
    assert v["val/spearman"] == pytest.approx(want["spearman"], rel=1e-6)
    assert set(v) == {"val/pearson", "val/spearman", "val/pearson_and_spearman", "val/loss"}
    with pytest.raises(DataError, match="has 100 pieces but the --init encoder embeds 500"):
        enc = get_preset("text_base_debug")
        enc.model.text.vocab_size = 500
        write_weights(tmp_path / "e.safetensors", Data2Vec(enc.model).encoder.state_dict(), enc.to_dict(), "encoder")
        plan_for(tmp_path / "e.safetensors", tmp_path / "sts", tmp_path / "sts", tmp_path)
    codec = SentenceCodec(128, 100, num_classes=2)
    with pytest.raises(DataError, match="a sample has class 2 but the head has 2 classes"):
        codec.collate([(torch.tensor([0, 5, 2]), 1), (torch.tensor([0, 2]), 2)])


def test_presets_carry_the_released_glue_recipes():
    for task, (lr, steps, warmup, batch, rows) in GLUE_RECIPES.items():
        c = get_preset(f"text_base_glue_{task}")
        assert (c.optim.lr, c.optim.max_steps, c.optim.warmup_steps, c.data.batch_size) == (lr, steps, warmup, batch)
        assert c.optim.betas == (0.9, 0.98) and c.optim.eps == 1e-6 and c.optim.weight_decay == 0.1
        assert c.optim.schedule == "polynomial" and c.finetune.task == "text_classification"
        assert 0.05 < warmup / steps < 0.065 or task == "qqp"           # 6% warmup (qqp.yaml: 25%)
    from d2v_scale.optim import lr_at
    o = get_preset("text_base_glue_rte").optim
    assert lr_at(61, o) == pytest.approx(1e-5) and lr_at(122, o) == pytest.approx(2e-5)
    assert lr_at((122 + 2036) // 2, o) == pytest.approx(1e-5) and lr_at(2036, o) == 0.0   # straight to 0


# -- end to end ------------------------------------------------------------------------------------------

@pytest.mark.timeout(400)
def test_pretrained_text_encoder_finetunes_to_tell_licenses_apart(corpus_dir, spm_model, tmp_path):
    """d2v-shard text -> d2v train (debug text preset) -> d2v-shard glue -> d2v finetune: validation
    accuracy above chance (3 balanced classes), the best exported and loadable, and a run stopped half
    way and resumed takes the uninterrupted run's steps."""
    d2v_shard(["text", str(corpus_dir), str(tmp_path / "pre"), "--spm", str(spm_model), "--tokens_per_sample", "64",
               "--workers", "1"])
    run_d2v(["train", "--preset", "text_base_debug", "--data", str(tmp_path / "pre" / "index.json"), "--ds_config",
             "ds_configs/zero2.json", "--out", str(tmp_path / "pt"), "--optim.max_steps=150", "--optim.warmup_steps=10",
             "--data.num_workers=1", "--run.log_every=50", "--run.save_every=150"])
    train, dev = license_tsvs(tmp_path / "lic")
    for split, tsv in (("train", train), ("dev", dev)):
        shard_glue(tsv, tmp_path / split, "--spm", spm_model, "--sentence1", "passage", "--label", "license",
                   "--max_positions", 64)
    with pytest.raises(DataError, match="pre: not sentence shards of `d2v-shard glue`"):
        plan_for(tmp_path / "pt", tmp_path / "pre", tmp_path / "dev", tmp_path)          # pretraining blocks
    shard_glue(train, tmp_path / "binary", "--spm", spm_model, "--sentence1", "passage", "--label", "license",
               "--max_positions", 64, "--label_names", "GPL-3,MPL-2.0,Apache-2.0")
    with pytest.raises(DataError, match="--train holds classes GPL-3, MPL-2.0, Apache-2.0 but --val holds classes "
                                        "Apache-2.0, GPL-3, MPL-2.0: shard both TSVs with the same"):
        plan_for(tmp_path / "pt", tmp_path / "binary", tmp_path / "dev", tmp_path)
    counts = json.loads((tmp_path / "dev" / "index.json").read_text())["glue"]["label_counts"]
    chance = 100 * max(counts) / sum(counts)                                   # the majority class: 1/3

    def args(out, init, *extra):
        return ["finetune", "--task", "text_classification", "--init", str(init), "--train", str(tmp_path / "train"),
                "--val", str(tmp_path / "dev"), "--ds_config", "ds_configs/zero2.json", "--out", str(out),
                "--optim.max_steps=100", "--optim.lr=1e-3", "--finetune.eval_every=50", "--data.num_workers=1",
                "--run.log_every=10", "--run.save_every=50", "--run.keep_last=2", *extra]
    out = run_d2v(args(tmp_path / "full", tmp_path / "pt")).stdout
    assert "text_base_glue_debug | text_classification" in out and "3 classes (Apache-2.0, GPL-3, MPL-2.0)" in out
    rewound(tmp_path / "full", tmp_path / "split", 50)
    assert "resumed from" in run_d2v(args(tmp_path / "split", tmp_path / "pt", "--resume", "auto")).stdout
    assert losses(tmp_path / "full") == losses(tmp_path / "split")

    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    best = summary["val_best_accuracy"]
    assert best > chance + 10, (best, chance)
    clf = d2v_scale.load_encoder(tmp_path / "full" / "best.safetensors")
    assert clf.head_state["head.out_proj.weight"].shape == (3, 64) and clf.modality == "text"

    # the probes read sentence shards as sentences (every sample decoded, none skipped as a text block)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = probe(str(tmp_path / "pt"), str(tmp_path / "train"), str(tmp_path / "dev"), how="knn", num_workers=0)
    assert not [w for w in seen if "skipping" in str(w.message)] and 0 < res["mean"]["knn_top1"] <= 100
