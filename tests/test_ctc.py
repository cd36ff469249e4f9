"""Speech recognition fine-tuning (--task audio_ctc): the letter dictionary in fairseq's format, the
transcript sources of d2v-shard audio and their refusals, wav2vec 2.0's masks and freezing, fairseq's
tri-stage schedule, the golden fairseq encoder inside the CTC model, and one run on sentences spoken
by espeak-ng: d2v-shard with transcripts -> d2v train -> d2v finetune -> d2v transcribe, greedy and
beam search with a lexicon and an n-gram LM built here."""
import contextlib
import io
import json
import math
import random
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from d2v_scale import cli
from d2v_scale.config import ConfigError, LMConfig
from d2v_scale.data import DataError, find_shards
from d2v_scale.data.letters import LetterDict, letters_to_text, to_letters
from d2v_scale.evaluate.ctc_decode import BeamDecoder, error_rates, greedy_decode, write_lexicon
from d2v_scale.fairseq import from_fairseq
from d2v_scale.models.ctc import CTCModel, span_mask
from d2v_scale.optim import lr_at
from d2v_scale.presets import get_preset
from d2v_scale.pretrained import read_encoder
from d2v_scale.tasks.audio_ctc import AudioCTC, ctc_loss
from d2v_scale.tools.demo_data import espeak
from data_prep.transcripts import read_transcripts
from helpers import BIN, child_env, losses, run_d2v

ASSETS = Path(__file__).parent / "assets"
WORDS = ["YES", "NO", "GO", "STOP", "UP", "DOWN", "LEFT", "RIGHT"]


def shard(*args, check=True):
    res = subprocess.run([str(BIN / "d2v-shard"), *map(str, args)], env=child_env(), capture_output=True, text=True,
                         timeout=120)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    """16 three-word commands spoken by espeak-ng (one voice), each with its `.wrd` beside it."""
    if espeak() is None:
        pytest.fail("espeak-ng is missing: `make test` installs it (apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("spoken")
    rng = random.Random(0)
    for i in range(16):
        words = " ".join(rng.choice(WORDS) for _ in range(3))
        subprocess.run([espeak(), "-v", "en-us", "-s", "150", "-w", str(out / f"utt{i:02d}.wav"), words.lower()],
                       check=True, capture_output=True, timeout=60)
        (out / f"utt{i:02d}.wrd").write_text(words + "\n")
    return out


def test_letters_follow_fairseq_and_bad_transcripts_are_refused(spoken, tmp_path):
    # libri_labels.py: letters of the words, "|" between words and at the end
    assert to_letters("HI  YOU ") == ["H", "I", "|", "Y", "O", "U", "|"]
    assert letters_to_text(to_letters("GO LEFT")) == "GO LEFT"
    d = LetterDict.build(["GO LEFT", "GO"])
    assert d.text().splitlines()[:2] == ["| 3", "G 2"]                           # by count, as Dictionary.save
    back = LetterDict.load(d.save(tmp_path / "dict.ltr.txt"))
    assert back.symbols == d.symbols and len(back) == 4 + len(d.symbols)          # <s> <pad> </s> <unk> first
    assert back.decode(back.encode("LEFT GO")) == "LEFT GO"
    with pytest.raises(DataError, match=r"characters outside the letter dictionary \('I' 'Q' 'U' 'Z' in 'QUIZ'\)"):
        d.encode("QUIZ")

    files = sorted(p.name for p in spoken.glob("*.wav"))
    assert read_transcripts("beside", "", str(spoken), files)["utt00.wav"] == (spoken / "utt00.wrd").read_text().strip()
    (tmp_path / "src").mkdir()
    for name in files[:2]:
        (tmp_path / "src" / name).write_bytes((spoken / name).read_bytes())
    with pytest.raises(ValueError, match=r"1 of 2 audio files have no transcript \(first: utt01.wav\)"):
        (tmp_path / "src" / "utt00.txt").write_text("GO\n")
        read_transcripts("beside", "", str(tmp_path / "src"), files[:2])
    table = tmp_path / "t.tsv"
    table.write_text("file\tsentence\nutt00.wav\tGO\n")
    with pytest.raises(ValueError, match=r"no column 'path' in its header \(file, sentence\)"):
        read_transcripts(str(table), "", str(tmp_path / "src"), files[:1])
    assert read_transcripts(str(table), "", "", files[:1], ("file", "sentence")) == {"utt00.wav": "GO"}
    manifest = tmp_path / "train.tsv"                                            # fairseq manifest + libri_labels .ltr
    manifest.write_text(f"{spoken}\nutt00.wav\t1\nutt01.wav\t1\n")
    (tmp_path / "train.ltr").write_text("G O | L E F T |\nU P |\n")
    assert read_transcripts("manifest", str(manifest), str(spoken), ["utt00.wav", "utt01.wav"]) == \
        {"utt00.wav": "GO LEFT", "utt01.wav": "UP"}
    res = shard("audio", tmp_path / "src", tmp_path / "none", "--transcripts", "beside", "--min_seconds", 0.5, check=False)
    assert res.returncode != 0 and res.stderr.strip().count("\n") == 0 and "have no transcript" in res.stderr


def test_masks_freezing_schedule_and_the_fairseq_encoder(tmp_path):
    """compute_mask_indices' span count, mask_emb on masked frames, the CNN and (freeze_finetune_updates)
    the encoder without gradients, tri_stage's phases; the golden fairseq audio checkpoint in the model."""
    rng = np.random.RandomState(0)
    m = span_mask((200, 100), [100] * 100 + [50] * 100, 0.65, 10, 2, rng)
    assert 0.4 < m[:100].mean() < 0.6 and not m[100:, 50:].any()                 # overlapping spans, padding untouched
    assert (span_mask((4, 30), [30] * 4, 0.0, 10, 2, rng).sum(1) >= 10).all()   # min_masks 2

    g = torch.load(ASSETS / "audio_tiny.pt", weights_only=True)              # as --init checkpoint_best.pt
    ckpt = {"model": {**g["student_state_dict"], "_ema": g["teacher_state_dict"]}, "cfg": {"model": json.loads(g["config"])}}
    torch.save(ckpt, tmp_path / "checkpoint_best.pt")
    fairseq, weights = from_fairseq(ckpt), read_encoder(tmp_path / "checkpoint_best.pt")
    cfg = get_preset("audio_base_ctc_debug")
    cfg.model = weights.cfg.model
    task = AudioCTC(cfg)
    task.letters = LetterDict.build(["GO LEFT"])
    model = task.build_model(weights)
    enc_state = model.encoder.state_dict()
    assert all(torch.equal(enc_state[k], v) for k, v in weights.encoder.items())
    x = torch.randn(2, 16000)
    with torch.no_grad():
        ref, _ = fairseq.student.encoder.extract_features(x)
        model.eval()
        logits, _ = model(x)
        feats, _ = model.encoder.local_features(x)
        model.train()
        masked = model.apply_mask(feats, None, seed=3)
    assert logits.shape == (2, ref.shape[1], len(task.letters))
    zeroed = (masked == 0).all(1)                                                # (B, C) masked channels
    on = ((masked == model.mask_emb) | zeroed[:, None]).all(-1)                  # (B, T) time-masked frames
    assert on.any() and not on.all() and zeroed.any() and not zeroed.all()
    target, lengths = task.letters.encode("GO LEFT")[None].repeat(2, 1), torch.tensor([8, 8])
    for frozen in (False, True):
        model.zero_grad(set_to_none=True)
        out, pad = model(x, None, mask_seed=1, layer_seed=1, frozen=frozen)
        ctc_loss(out, pad, target, lengths).backward()
        assert all(p.grad is None for p in model.encoder.feature_extractor.parameters())   # feature_grad_mult 0
        assert (model.encoder.blocks[0].attn.qkv.weight.grad is None) == frozen and model.head.weight.grad is not None

    o = get_preset("audio_base_ctc").optim                                       # base_100h.yaml: 8k / 32k / 40k
    assert o.schedule == "tri_stage" and lr_at(0, o) == pytest.approx(3e-7)
    assert lr_at(8_000, o) == lr_at(39_999, o) == pytest.approx(3e-5)
    assert lr_at(80_000, o) == pytest.approx(1.5e-6) and lr_at(60_000, o) == pytest.approx(3e-5 * 0.05 ** 0.5)
    with pytest.raises(ConfigError, match="needs --lm.lexicon"):
        BeamDecoder(task.letters, LMConfig(kenlm="lm.arpa"))


def write_arpa(sentences: list[str], path: Path, discount: float = 0.7) -> Path:
    """A word bigram LM in ARPA format (absolute-discount backoff), which flashlight's KenLM reads."""
    uni, bi = Counter(), Counter()
    for s in sentences:
        words = ["<s>", *s.split(), "</s>"]
        uni.update(words)
        bi.update(zip(words, words[1:]))
    total = sum(c for w, c in uni.items() if w != "<s>")
    p_uni = {w: c / total for w, c in uni.items() if w != "<s>"}
    lines = ["\\data\\", f"ngram 1={len(uni) + 1}", f"ngram 2={len(bi)}", "", "\\1-grams:"]
    for w in sorted(uni) + ["<unk>"]:
        seen = {b: c for (a, b), c in bi.items() if a == w}
        left = discount * len(seen) / max(1, sum(seen.values()))                 # mass left for backing off
        backoff = math.log10(left / max(1e-9, 1 - sum(p_uni[b] for b in seen))) if seen else 0.0
        prob = -99.0 if w == "<s>" else math.log10(p_uni.get(w, 1e-6))
        lines.append(f"{prob:.6f}\t{w}\t{backoff:.6f}" if w != "</s>" else f"{prob:.6f}\t{w}")
    lines += ["", "\\2-grams:"]
    for (a, b), c in sorted(bi.items()):
        lines.append(f"{math.log10((c - discount) / sum(v for (x, _), v in bi.items() if x == a)):.6f}\t{a} {b}")
    path.write_text("\n".join(lines + ["", "\\end\\", ""]))
    return path


@pytest.mark.timeout(420)
def test_spoken_commands_pretrain_finetune_transcribe(spoken, tmp_path):
    """espeak-ng commands -> transcribed shards -> a debug encoder pretrained 40 steps -> CTC fine-tuning:
    the loss falls, greedy WER on the training utterances goes from 100% to far below, `d2v transcribe`
    prints the transcripts, beam search with a lexicon and a bigram LM does no worse than greedy; a
    --val transcript with letters outside the dictionary is refused before any rank starts."""
    shards = tmp_path / "shards"
    out = shard("audio", spoken, shards, "--transcripts", "beside", "--min_seconds", 0.5, "--maxcount", 4,
                "--workers", 1).stdout
    assert "wrote 16 audio chunks in 4 shards" in out
    letters = LetterDict.load(shards / "dict.ltr.txt")
    assert set(letters.symbols) == set("".join(WORDS)) | {"|"}

    run_d2v(["train", "--preset", "audio_base_debug", "--data", str(shards), "--ds_config", "ds_configs/zero2.json",
             "--out", str(tmp_path / "pre"), "--optim.max_steps=40", "--optim.warmup_steps=5", "--data.num_workers=1",
             "--run.log_every=10", "--run.progress=false"])

    # before fine-tuning: the pretrained encoder with a new head transcribes nothing right
    cfg = get_preset("audio_base_ctc_debug")
    weights = read_encoder(tmp_path / "pre")
    cfg.model = weights.cfg.model
    task = AudioCTC(cfg)
    task.letters = letters
    codec = task.val_codec()
    items = [codec.decode(s) for s in wds.tarfile_to_samples()(iter({"url": u} for u in find_shards(str(shards)).urls))]
    batch = codec.collate(items)
    model = task.build_model(weights).eval()
    with torch.no_grad():
        logits, pad = model(batch["source"], batch["padding_mask"])
    before = error_rates(greedy_decode(logits, CTCModel.frame_lengths(logits, pad), letters), batch["text"])
    assert before["wer"] == 100.0

    # a 40-step pretrained encoder is nearly random: the CNN trains too, and no layerdrop and no masks
    # (regularisers for 100 h of speech: on these 16 utterances even 5% of the frames stall the loss
    # for hundreds of steps; the masking itself is checked above)
    ft = tmp_path / "ft"
    res = run_d2v(["finetune", "--task", "audio_ctc", "--init", str(tmp_path / "pre"), "--train", str(shards),
                   "--val", str(shards), "--ds_config", "ds_configs/zero2.json", "--out", str(ft),
                   "--optim.max_steps=400", "--optim.lr=3e-3", "--data.num_workers=1", "--data.epoch_samples=1600",
                   "--finetune.eval_every=200", "--finetune.mask_prob=0", "--finetune.mask_channel_prob=0",
                   "--finetune.layerdrop=0",
                   "--finetune.freeze_feature_encoder=false", "--run.log_every=25", "--run.save_every=200",
                   "--run.progress=false"],
                  timeout=240).stdout
    assert "audio_base_ctc_debug | audio_ctc | " in res and "17 letters + blank" in res
    curve = losses(ft)
    rows = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/wer" in r]
    assert curve[-1] < curve[0] / 5, curve
    assert [r["step"] for r in val] == [200, 400] and val[-1]["val/wer"] < 30, val
    assert (ft / "dict.ltr.txt").read_text() == letters.text()
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["val_best_wer"] == min(r["val/wer"] for r in val)

    greedy = run_d2v(["transcribe", "--init", str(ft / "best.safetensors"), "--audio", str(spoken)], timeout=120).stdout
    lines = dict(line.split("\t") for line in greedy.splitlines() if line.startswith(str(spoken)))
    assert len(lines) == 16 and float(greedy.split("greedy: WER ")[1].split()[0]) < 30
    assert sum(lines[str(spoken / f"utt{i:02d}.wav")] == (spoken / f"utt{i:02d}.wrd").read_text().strip()
               for i in range(16)) >= 8

    # half-way (step 200, greedy WER far from 0): beam search over a lexicon of the 8 words, with and
    # without a bigram LM of the training sentences, does no worse than greedy
    texts = [t for _, t, _ in items]
    write_lexicon({w for t in texts for w in t.split()}, tmp_path / "lexicon.txt")
    arpa = write_arpa(texts, tmp_path / "lm.arpa")

    def wer_at_200(**lm):                     # in this process: the command was run above already
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.transcribe(init=str(ft), tag="step_00000200", audio=str(shards), **{f"lm.{k}": v for k, v in lm.items()})
        return float(out.getvalue().split(": WER ")[1].split()[0])
    half = wer_at_200()
    assert half == pytest.approx(val[0]["val/wer"], abs=0.01)                   # printed to 2 decimals
    lexicon_only = wer_at_200(lexicon=str(tmp_path / "lexicon.txt"))
    with_lm = wer_at_200(lexicon=str(tmp_path / "lexicon.txt"), kenlm=str(arpa), weight=1.0, word_score=0, beam=20)
    assert with_lm <= half and lexicon_only <= half, (half, lexicon_only, with_lm)
    print(f"\nCTC loss {curve[0]:.2f} -> {curve[-1]:.2f}; greedy WER/CER {before['wer']:.1f}/{before['cer']:.1f} -> "
          f"{val[-1]['val/wer']:.1f}/{val[-1]['val/cer']:.1f}; step 200: greedy WER {half:.1f}, beam + lexicon "
          f"{lexicon_only:.1f}, + bigram LM {with_lm:.1f}")

    (tmp_path / "odd").mkdir()                                                     # a --val letter not in --train's
    for name in ("utt00", "utt01"):
        (tmp_path / "odd" / f"{name}.wav").write_bytes((spoken / f"{name}.wav").read_bytes())
        (tmp_path / "odd" / f"{name}.wrd").write_text("QUICK GO\n")
    shard("audio", tmp_path / "odd", tmp_path / "oddshards", "--transcripts", "beside", "--min_seconds", 0.5)
    with pytest.raises(SystemExit) as refused:             # `d2v check` in this process: its exit line
        cli.main(["check", "--task", "audio_ctc", "--init", str(tmp_path / "pre"), "--train", str(shards),
                  "--val", str(tmp_path / "oddshards"), "--out", str(tmp_path / "x")])
    line = str(refused.value)
    assert "\n" not in line and not (tmp_path / "x").exists()
    assert line.startswith("d2v: error: --val") and "outside the letter dictionary ('C' 'K' 'Q' in 'QUICK GO')" in line


def test_transcribe_names_and_skips_inputs_that_are_missing_or_not_audio(tmp_path, capsys):
    """A missing path or a file that is not audio: one line naming it, before the model loads; in a
    list, the bad input is named and skipped, the others are transcribed, and the exit is an error."""
    from d2v_scale.export import write_weights
    from d2v_scale.models import build_encoder
    cfg = get_preset("audio_base_ctc_debug")
    letters = LetterDict.build(["YES NO"])
    model = CTCModel(build_encoder(cfg.model), cfg.model.embed_dim, len(letters))
    init = tmp_path / "best.safetensors"
    write_weights(init, model.state_dict(), cfg.to_dict(), "classifier", info={"letters": letters.text()})
    good = tmp_path / "good.wav"
    import soundfile as sf
    sf.write(good, (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is text, not audio\n")

    for bad, why in ((tmp_path / "missing.wav", "no such file or folder"), (not_audio, "not readable audio")):
        with pytest.raises(SystemExit) as e:
            cli.main(["transcribe", "--init", str(init), "--audio", str(bad)])
        assert str(e.value).startswith(f"d2v: error: --audio {bad}: {why}") and "\n" not in str(e.value)

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["transcribe", "--init", str(init), "--audio",
                  f"{good},{not_audio},{tmp_path / 'missing.wav'},{good}"])
    out, err = capsys.readouterr()
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(good), str(good)]
    assert f"skipped {not_audio}: not readable audio" in err and f"skipped {tmp_path / 'missing.wav'}: no such" in err
    assert "2 input(s) skipped" in str(e.value) and "2 utterances transcribed" in str(e.value)
