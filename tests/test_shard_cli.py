"""d2v-shard on local destinations: every source kind, bad inputs, determinism, index-last."""
import io
import json
import signal
import subprocess
import tarfile
import time

import numpy as np
import soundfile as sf

from helpers import BIN, child_env


def shard(*args, check=True):
    res = subprocess.run([str(BIN / "d2v-shard"), *map(str, args)], env=child_env(), capture_output=True, text=True,
                         timeout=300)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}


def test_image_layout_class_map_and_determinism(image_dir, tmp_path):
    a = shard("image", image_dir, tmp_path / "a", "--maxcount", 20, "--workers", 1).stdout
    shard("image", image_dir, tmp_path / "b", "--maxcount", 20, "--workers", 2)
    assert "wrote 96 images in 5 shards" in a
    ia, ib = (json.loads((tmp_path / d / "index.json").read_text()) for d in "ab")
    assert [s["sha256"] for s in ia["shards"]] == [s["sha256"] for s in ib["shards"]]   # any worker count
    assert json.loads((tmp_path / "a" / "classes.json").read_text()) == {"circle": 0, "square": 1, "star": 2, "triangle": 3}
    m = members(tmp_path / "a" / "shard-000000.tar")
    assert any(k.endswith(".png") for k in m) and any(k.endswith(".cls") for k in m)
    shard("image", image_dir, tmp_path / "c", "--max_size", 24)
    big = [k for k in members(tmp_path / "c" / "shard-000000.tar") if k.endswith(".jpg")]
    assert big, "re-encoded only when asked: --max_size gives JPEGs"


def test_audio_folder_and_manifest(speech_dir, tmp_path):
    long = np.sin(np.linspace(0, 3000, 7 * 44100)).astype(np.float32) * 0.3
    sf.write(speech_dir.parent / "extra_long.wav", long, 44100)               # 7 s at 44.1 kHz, outside the folder
    (tmp_path / "src").mkdir()
    sf.write(tmp_path / "src" / "long.wav", np.stack([long, long], 1), 44100)  # stereo
    sf.write(tmp_path / "src" / "short.flac", long[:20000], 44100)             # 0.45 s: too short
    (tmp_path / "src" / "notes.wav").write_text("not audio")
    out = shard("audio", tmp_path / "src", tmp_path / "a", "--max_seconds", 3, "--min_seconds", 1).stdout
    assert "wrote 3 audio chunks" in out and "skipped 1 of 3 inputs" in out and "dropped 1 chunks" in out
    skipped = json.loads((tmp_path / "a" / "skipped.json").read_text())
    assert skipped[0]["input"] == "notes.wav" and "not readable audio" in skipped[0]["error"]
    for name, data in members(tmp_path / "a" / "shard-000000.tar").items():
        if name.endswith(".flac"):
            wav, sr = sf.read(io.BytesIO(data))
            assert sr == 16000 and wav.ndim == 1 and len(wav) <= 3 * 16000
    shard("manifest", speech_dir, tmp_path / "man", "--valid_percent", 0.25, "--ext", "wav")
    train = (tmp_path / "man" / "train.tsv").read_text().splitlines()
    valid = (tmp_path / "man" / "valid.tsv").read_text().splitlines()
    assert train[0] == str(speech_dir.resolve()) and len(train) + len(valid) - 2 == 24
    assert int(train[1].split("\t")[1]) > 16000
    out = shard("audio", tmp_path / "man" / "train.tsv", tmp_path / "b", "--max_seconds", 30).stdout
    assert f"wrote {len(train) - 1} audio chunks" in out


def test_text_blocks_follow_fairseq_none_break_mode(corpus_dir, spm_model, tmp_path):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("first line of a document\nsecond line\n\nanother document starts here\n" * 20)
    shard("text", one, tmp_path / "t", "--spm", spm_model, "--tokens_per_sample", 32)
    blocks = [np.load(io.BytesIO(v)) for k, v in sorted(members(tmp_path / "t" / "shard-000000.tar").items())
              if k.endswith(".ids.npy")]
    assert all(b.shape == (32,) and b[0] == 0 for b in blocks)                  # <s> + 31 tokens
    stream = np.concatenate([b[1:] for b in blocks])
    expect = []
    for line in (one / "a.txt").read_text().splitlines():
        if line:
            expect += sp.encode(line) + [2]                                   # each line ends with </s>
    assert stream.tolist() == expect[: len(stream)]                            # runs across documents
    index = json.loads((tmp_path / "t" / "index.json").read_text())
    assert index["vocab_size"] == 500 and index["tail_tokens_dropped"] == len(expect) - len(stream)


def test_clear_errors_for_bad_sources(tmp_path, spm_model):
    (tmp_path / "empty").mkdir()
    assert "does not exist" in shard("image", tmp_path / "nope", tmp_path / "o", check=False).stderr
    assert "contains no images" in shard("image", tmp_path / "empty", tmp_path / "o", check=False).stderr
    assert "has no audio files" in shard("audio", tmp_path / "empty", tmp_path / "o", check=False).stderr
    assert "spm-train" in shard("text", tmp_path / "empty", tmp_path / "o", "--spm", tmp_path / "x.model", check=False).stderr
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"\x00\x01" * 100)
    res = shard("text", tmp_path / "bin", tmp_path / "o", "--spm", spm_model, check=False)
    assert res.returncode != 0 and "binary file" in res.stderr
    res = shard("image", tmp_path / "empty", tmp_path / "o.tar", check=False)
    assert "placeholder" in res.stderr or "contains no images" in res.stderr


def test_interrupted_run_leaves_no_index(image_dir, tmp_path):
    """Ctrl-C mid-run: finished shards stay, the open one is removed, no index points anywhere."""
    big = tmp_path / "many"
    from d2v_scale.tools.demo_data import make_images
    make_images(big, 300, size=32, seed=3)
    for png in list(big.glob("*/*.png")):              # 12,000 inputs (hard links): ~10 s of work, so the
        for k in range(39):                            # interrupt lands mid-run however slow this machine is
            (png.parent / f"{png.stem}_{k}.png").hardlink_to(png)
    proc = subprocess.Popen([str(BIN / "d2v-shard"), "image", str(big), str(tmp_path / "out"), "--maxcount", "50",
                             "--workers", "1"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # a suite started in the background (`make test &`) inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "out").glob("shard-*.tar"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "out" / "index.json").exists()
    assert not list((tmp_path / "out").glob("*.partial"))
    for tar in (tmp_path / "out").glob("shard-*.tar"):               # every shard on disk is complete
        assert len(members(tar)) == 3 * 50                           # png + cls + src.txt
