"""Nothing runs that was not asked, nothing written is lost, every bad input stops early with one line.

Shell commands hidden in shard lists, code hidden in checkpoints, runs restarted over existing work,
broken checkpoints, inputs that used to hang or crash the ranks, stale shards after re-sharding, and
the commands' errors (one line naming the problem and the fix, never a traceback).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from d2v_scale.checkpoint import validate, weights_only_loads

from helpers import BIN, ROOT, TRAIN_ARGS, ZERO2_ARGS as RUN_ARGS, child_env, d2v_here, run_d2v


class Payload:
    """Unpickling this object runs `touch MARKER` (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line_error(res):
    lines = [l for l in res.stdout.strip().splitlines() if l.strip()]
    assert res.returncode != 0, res.stdout[-2000:]
    assert "Traceback" not in res.stdout, res.stdout[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def trained_run(zero2_run):
    """One 1-rank ZeRO-2 run of 4 steps with checkpoints at steps 2 and 4 (RUN_ARGS, shared with
    test_train.py); tests work on copies."""
    return zero2_run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def step_dir(run, step):
    return run / "checkpoints" / f"step_{step:08d}"


# -- 1. a shard list never runs a shell command ------------------------------------------------------

def test_pipe_url_inside_an_index_is_refused_and_never_runs(image_shards, tmp_path):
    from d2v_scale.data import DataError, build_loader, find_shards
    from d2v_scale.presets import get_preset
    marker = tmp_path / "ran"
    index = json.loads((image_shards / "index.json").read_text())
    real = str(image_shards / index["shards"][0]["url"])
    index["shards"] = [{"url": real}, {"url": f"pipe://touch {marker} && cat {real}"}]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="pipe: URL runs a shell command"):
        find_shards(str(tmp_path / "index.json"))
    for url in ("gs://bucket/x.tar", "-"):                  # other shell-backed schemes, stdin
        with pytest.raises(DataError, match="shards must be local paths"):
            find_shards(url)
    # a shard list handed to the loader directly passes the same check
    cfg = get_preset("vit_base_patch16_debug")
    cfg.data.num_workers, cfg.data.batch_size, cfg.data.epoch_samples = 0, 4, 8
    with pytest.raises(DataError, match="pipe: URL"):
        build_loader(cfg, 0, 1, urls=[f"pipe:touch {marker}; cat {real}"])
    # and the pre-flight every launcher runs refuses the index before any rank starts
    res = d2v_here(["check", "--preset", "vit_base_patch16_debug", "--data", str(tmp_path / "index.json"),
                    "--out", str(tmp_path / "run"), "--data.num_workers=1"])
    assert "pipe: URL runs a shell command" in one_line_error(res)
    assert not marker.exists()


def test_allow_pipe_is_the_only_way_to_run_one(image_shards, tmp_path):
    from d2v_scale.data import build_loader
    from d2v_scale.presets import get_preset
    real = str(sorted(image_shards.glob("*.tar"))[0])
    cfg = get_preset("vit_base_patch16_debug")
    cfg.data.num_workers, cfg.data.batch_size, cfg.data.epoch_samples, cfg.data.allow_pipe = 0, 4, 8, True
    batch = next(iter(build_loader(cfg, 0, 1, urls=[f"pipe:cat {real}"])))
    assert batch["source"].shape == (4, 3, 32, 32)


# -- 2. checkpoints are read as weights only ------------------------------------------------------

@pytest.mark.timeout(400)
def test_checkpoint_with_a_code_payload_never_runs(run_copy, image_shards, tmp_path):
    marker = tmp_path / "ran"
    for step in (2, 4):                                     # every checkpoint of the run is crafted
        f = step_dir(run_copy, step) / "mp_rank_00_model_states.pt"
        with weights_only_loads():
            state = torch.load(f, map_location="cpu", weights_only=True)
        state["note"] = Payload(marker)
        torch.save(state, f)
    res = d2v_here(["export", str(run_copy), str(tmp_path / "enc.safetensors")])
    assert "Python objects beyond tensors" in one_line_error(res) and "posix.system" in res.stdout
    res = d2v_here(["train", "--data", str(image_shards), "--out", str(run_copy), "--resume", "auto",
                    "--optim.max_steps=6", *RUN_ARGS])
    assert "no usable checkpoint" in one_line_error(res) and "mp_rank_00_model_states.pt" in res.stdout
    assert not marker.exists()


# -- 3. runs are never restarted over existing work ------------------------------------------------

def test_resume_scans_past_missing_or_dangling_latest(run_copy):
    from d2v_scale.checkpoint import find_resume
    (run_copy / "checkpoints" / "latest").unlink()
    assert find_resume(run_copy, "auto", 1).tag == "step_00000004"
    (run_copy / "checkpoints" / "latest").write_text("step_00000099")
    point = find_resume(run_copy, "auto", 1)
    assert point.tag == "step_00000004" and not point.broken


@pytest.mark.parametrize("damage", ["truncated model states", "empty teacher", "truncated data position",
                                    "truncated optimizer states", "missing meta"])
def test_a_broken_checkpoint_is_named_and_passed_over(run_copy, damage):
    from d2v_scale.checkpoint import find_resume
    d = step_dir(run_copy, 4)
    name = {"truncated model states": "mp_rank_00_model_states.pt", "empty teacher": "teacher.pt",
            "truncated data position": "data_rank0.json", "missing meta": "meta.json",
            "truncated optimizer states": "zero_pp_rank_0_mp_rank_00_optim_states.pt"}[damage]
    f = d / name
    if damage == "missing meta":
        f.unlink()
    else:
        f.write_bytes(b"" if damage == "empty teacher" else f.read_bytes()[: f.stat().st_size // 2])
    point = find_resume(run_copy, "auto", 1)
    assert point.tag == "step_00000002"
    assert point.broken[0][0] == "step_00000004" and str(f) in point.broken[0][1]


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(run_copy):
    from d2v_scale.checkpoint import CheckpointError, find_resume
    for step in (2, 4):
        (step_dir(run_copy, step) / "teacher.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint .*step_00000004: .*teacher.pt is empty"):
        find_resume(run_copy, "auto", 1)


@pytest.mark.timeout(400)
def test_resume_falls_back_trains_on_and_keeps_one_row_per_step(run_copy, image_shards):
    """step 4's model states truncated and `latest` gone: the run resumes from step 2 (naming the file),
    keeps the broken checkpoint aside, trains steps 3-6 again, and metrics.jsonl / TensorBoard hold one
    row per step (the first steps 3-4 moved to metrics.superseded.jsonl)."""
    f = step_dir(run_copy, 4) / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    (run_copy / "checkpoints" / "latest").unlink()
    out = run_d2v(["train", "--data", str(image_shards), "--out", str(run_copy), "--resume", "auto",
                   "--optim.max_steps=6", *RUN_ARGS], timeout=300).stdout
    assert f"checkpoint step_00000004 is unusable: {f} cannot be read" in out
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert (run_copy / "checkpoints" / "step_00000004.broken" / "mp_rank_00_model_states.pt").exists()
    steps = [json.loads(l)["step"] for l in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    old = [json.loads(l)["step"] for l in (run_copy / "metrics.superseded.jsonl").read_text().splitlines()]
    assert old == [3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(run_copy / "tb"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_training_into_a_run_with_checkpoints_needs_resume(run_copy, image_shards):
    config_before = (run_copy / "config.json").read_text()
    metrics_before = (run_copy / "metrics.jsonl").read_text()
    for command in ("check", "train"):
        res = d2v_here([command, "--data", str(image_shards), "--out", str(run_copy), "--optim.max_steps=6",
                        *RUN_ARGS])
        line = one_line_error(res)
        assert "already holds checkpoints (newest step_00000004)" in line and "--resume auto" in line and "--out" in line
    assert (run_copy / "config.json").read_text() == config_before
    assert (run_copy / "metrics.jsonl").read_text() == metrics_before
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_00000004"


def test_resume_with_another_model_is_refused_before_anything_is_written(run_copy, image_shards):
    config_before = (run_copy / "config.json").read_text()
    args = ["--data", str(image_shards), "--out", str(run_copy), "--resume", "auto", *RUN_ARGS]
    res = d2v_here(["train", *args, "--preset", "vit_large_patch16_debug"])
    line = one_line_error(res)
    assert "builds another model than the run's" in line and "model.prenet_depth 1 -> 0" in line
    assert (run_copy / "config.json").read_text() == config_before
    res = d2v_here(["check", *args, "--optim.lr=5e-4", "--model.grad_checkpointing=true"])
    ok = res.stdout
    assert res.returncode == 0, ok
    assert "changed settings: optim.lr: 0.001 -> 0.0005" in ok and "resume from" in ok


# -- 4. inputs that hung or crashed the ranks ----------------------------------------------------------

@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("wav")
    t = np.arange(40_000) / 16_000
    for i in range(8):
        sf.write(src / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16_000)
    out = tmp_path_factory.mktemp("audio_shards")
    subprocess.run([str(BIN / "d2v-shard"), "audio", str(src), str(out / "a-%06d.tar"), "--maxcount", "2",
                    "--workers", "1"], check=True, capture_output=True, env=child_env())
    return out


def test_another_modalitys_index_is_refused_before_start(audio_shards, tmp_path):
    res = d2v_here(["check", "--preset", "vit_base_patch16_debug", "--data", str(audio_shards / "index.json"),
                    "--out", str(tmp_path / "run"), "--data.num_workers=1"])
    assert "holds audio shards (its index says so) but the preset trains the image encoder" in one_line_error(res)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_pass_without_one_usable_sample_stops_the_loader(audio_shards, workers):
    """The same shards without their index (a directory): the loader gives up after one whole pass
    in which no sample decoded, with the reason, instead of skipping samples forever."""
    from d2v_scale.data import DataError, build_loader
    from d2v_scale.presets import get_preset
    cfg = get_preset("vit_base_patch16_debug")
    cfg.data.path, cfg.data.num_workers, cfg.data.batch_size, cfg.data.sampling = str(audio_shards), workers, 4, "resample"
    warnings.simplefilter("ignore", UserWarning)           # the per-sample skip warnings (in-process at 0 workers)
    with pytest.raises(DataError, match=r"none of the last \d+ samples \(a whole pass .*has no image"):
        next(iter(build_loader(cfg, 0, 1)))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", ["train", "finetune"])
def test_a_stop_signal_ends_a_run_whose_data_never_arrives(image_shards, tmp_path, command):
    """One shard is a FIFO nobody writes to: the data stream blocks for good. SIGTERM must still end
    the process (exit 143) at once, with a checkpoint of the last completed step (no step can come:
    the run does not wait run.stop_timeout_s for one); pretraining and fine-tuning alike."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sorted(image_shards.glob("*.tar"))[0], data / "a-000000.tar")
    os.mkfifo(data / "a-000001.tar")
    args = ["--out", str(tmp_path / "run"), "--optim.max_steps=50", "--run.stop_timeout_s=5",
            "--data.shuffle_buffer=0", *RUN_ARGS]
    if command == "train":
        cmd = [sys.executable, "-m", "d2v_scale.cli", "train", "--data", str(data), *args]
    else:                                                   # labels from the folder names of the shards' keys
        from test_finetune import encoder_file
        index = json.loads((image_shards / "index.json").read_text())
        index["shards"] = [dict(index["shards"][0], url="a-000000.tar"), dict(index["shards"][1], url="a-000001.tar")]
        (data / "index.json").write_text(json.dumps(index))
        cmd = [sys.executable, "-m", "d2v_scale.cli", "finetune", "--task", "image_classification",
               "--init", str(encoder_file(tmp_path / "enc.safetensors")), "--train", str(data),
               "--val", str(image_shards / "index.json"), *[a for a in args if a not in TRAIN_ARGS[:2]]]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 200
        out = ""
        while "\nd2v_scale" not in "\n" + out and time.time() < deadline:
            out += proc.stdout.readline()                   # set-up done: the loop has started
        time.sleep(10)                                      # the stream is blocked on the FIFO by now
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the process ignored SIGTERM")
    assert proc.returncode == 143, out + rest
    assert "checkpointing the last completed step" in rest and "stopped by a signal at step" in rest, out + rest
    ckpts = tmp_path / "run" / "checkpoints"
    assert validate(ckpts / (ckpts / "latest").read_text()) is None


@pytest.mark.parametrize("args,msg", [
    (["--optim.lr=-1"], "--optim.lr=-1.0: must be a finite number > 0"),
    (["--optim.lr=nan"], "--optim.lr=nan: must be a finite number > 0"),
    (["--data.batch_size=0"], "--data.batch_size=0: must be an integer >= 1"),
    (["--ds.zero_optimization.stag=3"], "zero_optimization.stag: Extra inputs are not permitted"),
    (["--ds.bf16.enabled=maybe"], "bf16.enabled: Input should be a valid boolean"),
    (["--ds.zero_optimisation.stage=3"], "unknown key 'zero_optimisation'; did you mean 'zero_optimization'"),
    (["--ds.gradient_clipping=abc"], "gradient_clipping='abc': must be a number >= 0"),
    (["--optim.learning_rate=1e-3"], "unknown config key --optim.learning_rate; did you mean --optim.lr?"),
])
def test_preflight_catches_what_would_crash_the_ranks(image_shards, tmp_path, args, msg):
    from d2v_scale.presets import build_config
    from d2v_scale.errors import D2VError
    from d2v_scale.preflight import preflight
    overrides = dict(a.lstrip("-").split("=", 1) for a in args)
    with pytest.raises(D2VError) as e:
        cfg, ds = build_config("vit_base_patch16_debug", None, data=str(image_shards), out=str(tmp_path / "run"),
                               ds_config="ds_configs/zero2.json", **overrides)
        preflight(cfg, ds, world=1)
    assert msg in str(e.value)
    assert not (tmp_path / "run").exists()


def test_check_refuses_bad_out_dirs_and_non_tar_shards(image_shards, tmp_path):
    (tmp_path / "a_file").write_text("x")
    fake = tmp_path / "fake"
    fake.mkdir()
    for i in range(2):
        (fake / f"x-{i:06d}.tar").write_bytes(os.urandom(4096))
    cases = [(image_shards, tmp_path / "a_file", "is a file, not a run directory"),
             (image_shards, tmp_path / "a_file" / "run", "is a file, so no directory can be made under it"),
             (image_shards, "/proc/d2v-run", "cannot create files in /proc"),
             (fake, tmp_path / "r", "x-000000.tar is not a tar archive")]
    for data, out, msg in cases:
        res = d2v_here(["check", "--preset", "vit_base_patch16_debug", "--data", str(data), "--out", str(out),
                        "--data.num_workers=1", "--data.sampling=resample"])
        assert msg in one_line_error(res), (data, out, res.stdout[-1000:])


# -- 5. re-sharding leaves no stale shards ----------------------------------------------------------------

def test_resharding_into_a_destination_needs_overwrite_and_removes_exactly_the_old(image_dir, tmp_path):
    def shard(*extra, check=True):
        return subprocess.run([str(BIN / "d2v-shard"), "image", str(image_dir), str(tmp_path / "img-%06d.tar"),
                               "--workers", "1", *map(str, extra)], capture_output=True, text=True, env=child_env(),
                              timeout=300, check=check)
    shard("--maxcount", 12)
    (tmp_path / "notes.txt").write_text("mine")              # not a shard of this pattern: untouched
    res = shard("--maxcount", 48, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "already holds 8 shards of img-%06d.tar and an index: pass --overwrite" in res.stderr
    assert len(list(tmp_path.glob("img-*.tar"))) == 8
    shard("--maxcount", 48, "--overwrite")
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["img-000000.tar", "img-000001.tar"]
    index = json.loads((tmp_path / "index.json").read_text())
    with tarfile.open(tmp_path / "img-000001.tar") as tf:
        assert index["samples"] == 96 and sum(s["samples"] for s in index["shards"]) == 96
        assert len(tf.getmembers()) > 0
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- 6. one line, not a traceback ----------------------------------------------------------------------------

def test_export_errors_are_one_line(run_copy, tmp_path):
    (tmp_path / "a_file").write_text("x")
    f = step_dir(run_copy, 4) / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:500])
    cases = [([str(run_copy), str(tmp_path / "e.safetensors")], f"checkpoint step_00000004 is unusable: {f}"),
             ([str(run_copy), str(tmp_path / "e.safetensors"), "--tag", "step_00000077"],
              "--tag step_00000077: no such checkpoint"),
             ([str(run_copy), str(tmp_path / "a_file" / "e.safetensors"), "--tag", "step_00000002"],
              "is a file, not a directory"),
             ([str(tmp_path), str(tmp_path / "e.safetensors")], "no checkpoint in")]
    for args, msg in cases:
        assert msg in one_line_error(d2v_here(["export", *args])), args
    ok = d2v_here(["export", str(run_copy), str(tmp_path / "e.safetensors"), "--tag", "step_00000002"])
    assert ok.returncode == 0, ok.stdout


def test_import_fairseq_errors_are_one_line(tmp_path):
    import pathlib
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    # a config object torch.load(weights_only=True) refuses (omegaconf's in legacy fairseq files; an
    # argparse.Namespace, data2vec_vision's `args`, is read)
    torch.save({"model": {}, "cfg": {"model": {}}, "args": pathlib.PosixPath("/ckpt")}, tmp_path / "legacy.pt")
    torch.save({"model": {}, "cfg": {"model": {"embed_dim": 8}}}, tmp_path / "other.pt")
    cases = [("missing.pt", "missing.pt not found"), ("notes.txt", "is not a torch checkpoint"),
             ("legacy.pt", "refuses (pathlib.PosixPath)"), ("other.pt", "not a data2vec 2.0")]
    for name, msg in cases:
        res = d2v_here(["import-fairseq", str(tmp_path / name), str(tmp_path / "w.safetensors")])
        assert msg in one_line_error(res), name


def test_spm_train_skips_a_binary_file_and_names_it(corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (corpus / "data.txt").write_bytes(os.urandom(2000) + b"\x00" * 100)
    res = subprocess.run([str(BIN / "d2v-shard"), "spm-train", str(corpus), str(tmp_path / "spm" / "m"),
                          "--vocab_size", "300"], capture_output=True, text=True, env=child_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"skipping {corpus / 'data.txt'}: binary file, not text" in res.stderr
    assert (tmp_path / "spm" / "m.model").exists()


def test_unwritable_destinations_are_one_line(image_dir, image_shards, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for dst, msg in [("/proc/d2v/img-%06d.tar", "cannot create /proc/d2v"),
                     (str(tmp_path / "a_file" / "img-%06d.tar"), "a file is in the way")]:
        res = subprocess.run([str(BIN / "d2v-shard"), "image", str(image_dir), dst], capture_output=True,
                             text=True, env=child_env(), timeout=120)
        assert res.returncode != 0 and "Traceback" not in res.stderr and msg in res.stderr, res.stderr[-2000:]
    res = run_d2v(["train", "--data", str(image_shards), "--out", str(tmp_path / "a_file" / "run"), *RUN_ARGS],
                  check=False, timeout=120)
    assert "is a file, so no directory can be made under it" in one_line_error(res)


def test_a_stray_word_is_not_taken_for_an_option(image_shards, tmp_path):
    res = run_d2v(["train", "--preset", "vit_base_patch16_debug", "--data", str(image_shards), "--ds_config",
                   "ds_configs/zero2.json", "--out", str(tmp_path / "run"), "auto"], check=False, timeout=60)
    assert "unexpected argument 'auto': every option is a --flag" in one_line_error(res)
    assert not (tmp_path / "run").exists()


def test_deepspeed_ops_build_with_the_ninja_beside_python(monkeypatch):
    """The venv's ninja and the system's rewrite each other's build log and rebuild every op (30-40 s):
    the set-up puts the one beside this Python first on PATH."""
    from d2v_scale.dist import select_accelerator
    if not (BIN / "ninja").exists():
        pytest.skip("no ninja in this environment's bin/")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    select_accelerator()
    assert shutil.which("ninja") == str(BIN / "ninja")


def test_a_code_payload_is_not_a_checkpoint_and_no_advice_loads_it(tmp_path, capsys):
    """A pickle naming posix.system (alone, or behind a pathlib path that torch names first) is
    'not a checkpoint, do not load it', never the convert-it advice that would torch.load it with
    weights_only=False; a file holding only fairseq's config objects keeps that advice."""
    import pathlib

    from d2v_scale import cli
    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.zeros(2)}, "x": Payload(marker)}, tmp_path / "evil.pt")
    torch.save({"args": pathlib.PosixPath("/ckpt"), "model": {}, "x": Payload(marker)}, tmp_path / "mixed.pt")
    for name in ("evil.pt", "mixed.pt"):
        for argv in (["import-fairseq", str(tmp_path / name), str(tmp_path / "w.safetensors")],
                     ["probe", "--init", str(tmp_path / name), "--train", "x", "--val", "y"]):
            with pytest.raises(SystemExit) as e:
                cli.main(argv)
            msg = str(e.value)
            assert "is not a checkpoint" in msg and "posix.system" in msg and "do not load it" in msg, msg
            assert "python -c" not in msg and "trust the file" not in msg, msg
    assert not marker.exists()
    torch.save({"model": {}, "cfg": {"model": {}}, "args": pathlib.PosixPath("/ckpt")}, tmp_path / "legacy.pt")
    with pytest.raises(SystemExit) as e:
        cli.main(["import-fairseq", str(tmp_path / "legacy.pt"), str(tmp_path / "w.safetensors")])
    assert "refuses (pathlib.PosixPath)" in str(e.value) and "weights_only=False" in str(e.value)


SECRET_URL = "s3://AKIAEXAMPLEKEY:wJalrSECRETexample@bucket/img"


def test_credentials_inside_a_url_are_refused_and_never_printed(image_dir, tmp_path, capsys):
    """KEY:SECRET written into an s3:// (or http) URL: refused before anything runs or is written, with
    the AWS_* advice, naming the argument or key and never the URL, wherever the URL comes from."""
    from d2v_scale import cli
    from d2v_scale.data.s3 import S3Error, read_bytes
    from data_prep import cli as shard_cli
    out = tmp_path / "run"
    cases = [(cli.main, ["train", "--preset", "vit_base_patch16_debug", "--data", f"{SECRET_URL}/index.json",
                         "--ds_config", "ds_configs/zero2.json", "--out", str(out)], "--data"),
             (cli.main, ["probe", "--init", "x", f"--train={SECRET_URL}/index.json", "--val", "y"], "--train"),
             (cli.main, ["check", "--preset", "vit_base_patch16_debug", "--data", str(image_dir), "--eval.data",
                         f"{SECRET_URL}/index.json", "--out", str(out)], "--eval.data"),
             (shard_cli.main, ["image", str(image_dir), f"{SECRET_URL}/s-%06d.tar"], "argument 2 of `image`")]
    index = tmp_path / "idx" / "index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"shards": [{"url": f"{SECRET_URL}/s-000000.tar", "samples": 4}]}))
    cases.append((cli.main, ["check", "--preset", "vit_base_patch16_debug", "--data", str(index), "--out", str(out)],
                  "a remote URL"))
    from d2v_scale.presets import get_preset
    config = get_preset("vit_base_patch16_debug").to_dict()
    config["data"]["path"] = f"{SECRET_URL}/index.json"                      # a run's config.json
    (tmp_path / "config.json").write_text(json.dumps(config))
    cases.append((cli.main, ["check", "--from_json", str(tmp_path / "config.json"), "--out", str(out)], "--data.path"))
    for main, argv, where in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        printed = capsys.readouterr()
        msg = str(e.value)
        assert f"{where}: a URL with credentials" in msg and "AWS_ACCESS_KEY_ID" in msg, (argv, msg)
        shown = msg + printed.out + printed.err
        assert "wJalrSECRET" not in shown and "AKIAEXAMPLE" not in shown, shown
    assert not out.exists()
    for url in (f"{SECRET_URL}/index.json", "https://user:wJalrSECRETpass@host/x/index.json"):
        with pytest.raises(S3Error) as e:
            read_bytes(url)
        assert "wJalrSECRET" not in str(e.value) and "credentials" in str(e.value)
