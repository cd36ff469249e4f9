"""The object store stops mid-run (real SeaweedFS, killed): the run neither hangs nor loses its progress.

A stop signal while no batch can come checkpoints the last completed step at once (not after
run.stop_timeout_s, and not without a checkpoint); with no signal, `data.stall_timeout_s` without a batch
stops the run with one line naming the endpoint and the last complete checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from d2v_scale.checkpoint import validate
from helpers import ROOT, TRAIN_ARGS, child_env

ARGS = ["train", "--ds_config", "ds_configs/zero2.json", "--optim.max_steps=1000", "--run.save_every=3",
        *TRAIN_ARGS, "--data.shuffle_buffer=1", "--data.epoch_samples=400"]     # little read ahead of the steps


def start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "d2v_scale.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rows(run) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def wait_until(cond, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}: {proc.communicate()[0][-4000:]}")


def finish(proc, timeout) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not end within {timeout} s: {proc.communicate()[0][-4000:]}")


@pytest.mark.timeout(900)
def test_object_store_down_mid_run(s3, s3_images, tmp_path):
    env = child_env(**s3.env())
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    try:
        # 1. SIGTERM while the data is stalled: checkpoint of the last completed step, exit at once
        proc = start([*ARGS, "--data", s3_images, "--out", str(run), "--run.stop_timeout_s=300"], env)
        wait_until(lambda: len(rows(run)) >= 4, proc, 420, "step 4")
        s3.stop(hard=True)
        last, since = len(rows(run)), time.time()
        while time.time() - since < 10:                             # until no step has come for 10 s
            time.sleep(0.5)
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            if len(rows(run)) != last:
                last, since = len(rows(run)), time.time()
        steps = len(rows(run))
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out = finish(proc, 120)
        assert proc.returncode == 143, out[-4000:]
        assert time.time() - t0 < 60, "waited for run.stop_timeout_s"
        assert "no batch for" in out and f"checkpointing the last completed step ({steps})" in out, out[-4000:]
        tag = f"step_{steps:08d}"
        assert (ckpts / "latest").read_text() == tag and validate(ckpts / tag) is None
        assert not list(ckpts.glob("*.tmp"))
    finally:
        if s3.proc is None:
            s3.start()

    # 2. resumed; the store dies again and no signal comes: data.stall_timeout_s, then one line
    proc = start([*ARGS, "--data", s3_images, "--out", str(run), "--resume", "auto", "--data.stall_timeout_s=8"], env)
    try:
        wait_until(lambda: len(rows(run)) >= steps + 4, proc, 420, "4 more steps")
        s3.stop(hard=True)
        out = finish(proc, 240)
    finally:
        if s3.proc is None:
            s3.start()
    assert proc.returncode not in (0, 143), out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("d2v: error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-4000:]
    newest = (ckpts / "latest").read_text()
    assert "no batch for" in errors[0] and "--data.stall_timeout_s 8" in errors[0], errors[0]
    assert f"at endpoint {s3.endpoint}" in errors[0], errors[0]
    assert f"The last complete checkpoint is {ckpts / newest}; rerun with --resume auto" in errors[0], errors[0]
    assert validate(ckpts / newest) is None and int(newest.split("_")[1]) > steps
    assert s3.secret_key not in out
