"""Nothing destroys a run: a second `d2v train` on a busy --out is refused and writes nothing, the lock
of a killed run is taken over, and no command writes a named output over a checkpoint or an existing file."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from d2v_scale import runlock
from helpers import ROOT, TRAIN_ARGS, child_env, d2v_here, run_d2v


def train_args(data, out, steps, *extra):
    return ["train", "--data", str(data), "--ds_config", "ds_configs/zero2.json", "--out", str(out),
            f"--optim.max_steps={steps}", "--run.save_every=1000", *TRAIN_ARGS, *extra]


def wait_for_holder(lock, proc, timeout=420) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().strip() and (lock.parent / "config.json").exists():
            return json.loads(lock.read_text())                 # locked, and its run directory written
        time.sleep(0.2)
    pytest.fail(f"the first run never took the lock (exit {proc.poll()}): {proc.stdout.read()[-3000:] if proc.poll() is not None else ''}")


@pytest.mark.timeout(900)
def test_second_run_refused_and_a_killed_runs_lock_taken_over(image_shards, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "d2v_scale.cli", *train_args(image_shards, run, 400)],
                             cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        holder = wait_for_holder(run / runlock.LOCK_FILE, first)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        config = (run / "config.json").read_bytes()

        # the second run on the same --out: one line naming the holder, nothing written
        second = run_d2v(train_args(image_shards, run, 4, "--run.seed=7"), check=False, timeout=240)
        assert second.returncode != 0, second.stdout[-2000:]
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}" in second.stdout
        assert "choose another --out" in second.stdout and "Traceback" not in second.stdout
        assert (run / "config.json").read_bytes() == config                      # the first run's settings
        assert json.loads(config)["run"]["seed"] != 7
        check = d2v_here(["check", *train_args(image_shards, run, 4)[1:]])
        assert check.returncode != 0 and f"pid {first.pid}" in check.stdout, check.stdout[-2000:]
        assert first.poll() is None, "the first run was disturbed"
    finally:
        os.killpg(first.pid, signal.SIGKILL)                                   # a crash: no clean-up at all
        first.wait(timeout=60)
    assert json.loads((run / runlock.LOCK_FILE).read_text())["pid"] == first.pid    # its record stays

    # the killed run's lock is stale: the next run on this --out takes it over, says so, and releases it
    third = run_d2v(train_args(image_shards, run, 2, "--resume", "auto"), timeout=300)
    assert f"taking over the lock of a run that ended without releasing it (host {socket.gethostname()}, " \
           f"pid {first.pid}" in third.stdout and "is no longer running" in third.stdout
    assert not (run / runlock.LOCK_FILE).exists()                                # released at the end

    # `d2v export` onto the run's newest checkpoint file (the next resume would fall back a checkpoint)
    from d2v_scale.checkpoint import validate
    from d2v_scale.cli import main as d2v
    newest = run / "checkpoints" / "step_00000002"
    states = newest / "mp_rank_00_model_states.pt"
    before = states.read_bytes()
    for target in (states, newest / "enc.safetensors", run / "checkpoints" / "enc.safetensors"):
        msg = refused(d2v, ["export", run, target, "--overwrite"])
        assert f"is inside the checkpoints of run {run}" in msg and f"e.g. {run / target.name}" in msg, msg
    assert states.read_bytes() == before and validate(newest) is None
    enc = tmp_path / "enc.safetensors"
    d2v(["export", str(run), str(enc)])
    first_export = exported(enc)
    assert "already exists: pass --overwrite" in refused(d2v, ["export", run, enc])
    assert exported(enc) == first_export
    enc.write_bytes(b"")                                        # --overwrite replaces it, whatever it holds
    d2v(["export", str(run), str(enc), "--overwrite"])
    assert exported(enc) == first_export and not list(tmp_path.glob("*.partial"))


def exported(path) -> tuple:
    """A weights file's metadata and tensors (its bytes are not: safetensors writes the metadata map in
    no fixed order)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_lock_of_a_live_process_on_another_host_is_kept_until_its_heartbeat_stops(tmp_path):
    """A filesystem that keeps locks per host (NFS local_lock, Lustre localflock) grants the lock even
    while another host's run holds it: its record is trusted until the heartbeat is STALE_S old."""
    lock = tmp_path / runlock.LOCK_FILE
    lock.write_text(json.dumps({"host": "other-node-17", "pid": 4242, "started": "2026-01-01 00:00:00 UTC"}))
    with pytest.raises(runlock.RunLockError, match="in use by another run .host other-node-17, pid 4242.*wait"):
        runlock.check_free(tmp_path)
    with pytest.raises(runlock.RunLockError, match="other-node-17"):
        runlock.acquire(tmp_path)
    old = time.time() - runlock.STALE_S - 5
    os.utime(lock, (old, old))
    held, said = runlock.acquire(tmp_path)
    with held:
        assert "heartbeat stopped" in said and "other-node-17" in said
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        # a second holder in this very host: the kernel's lock refuses it
        probe = subprocess.run([sys.executable, "-c", "import sys; from d2v_scale import runlock; "
                                f"runlock.acquire({str(tmp_path)!r})"], cwd=ROOT, env=child_env(),
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and f"pid {os.getpid()}" in probe.stderr
    assert not lock.exists()



def refused(main, argv) -> str:
    """The one-line error of an in-process `d2v` / `d2v-shard` command that must refuse."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return str(e.value.code)


def test_named_outputs_never_replace_an_existing_file(tmp_path):
    """import-fairseq, spm-train and manifest replace an existing file only with --overwrite; export
    refuses a teacher file in the way before writing anything."""
    from d2v_scale.cli import main as d2v
    from data_prep.cli import main as d2v_shard

    mine = {tmp_path / "w.safetensors": "w", tmp_path / "x.teacher.safetensors": "t", tmp_path / "spm.vocab": "v",
            tmp_path / "man" / "valid.tsv": "m"}
    for f, text in mine.items():
        f.parent.mkdir(exist_ok=True)
        f.write_text(text)
    (tmp_path / "corpus.txt").write_text("".join(f"line {i} of words: {i * 7919 % 1000} pieces, learned quickly\n"
                                                 for i in range(300)))
    for main, argv in [(d2v, ["import-fairseq", tmp_path / "none.pt", tmp_path / "w.safetensors"]),
                       (d2v, ["export", tmp_path, tmp_path / "x.safetensors", "--teacher"]),
                       (d2v_shard, ["spm-train", tmp_path / "corpus.txt", tmp_path / "spm", "--vocab_size", "40"]),
                       (d2v_shard, ["manifest", tmp_path, tmp_path / "man"])]:
        msg = refused(main, argv)
        assert "already exists: pass --overwrite to replace it" in msg, (argv, msg)
    assert all(f.read_text() == text for f, text in mine.items())
    d2v_shard([str(a) for a in ["spm-train", tmp_path / "corpus.txt", tmp_path / "spm", "--vocab_size", "40",
                                "--overwrite"]])
    assert (tmp_path / "spm.model").stat().st_size > 0 and (tmp_path / "spm.vocab").read_text() != "v"
    assert not list(tmp_path.rglob("*.partial*"))


@pytest.mark.timeout(600)
def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_last_checkpoint(image_shards, tmp_path):
    """A real ENOSPC: the run dir on a small tmpfs, filled (up to 1 MiB) once the first checkpoint is in."""
    import shutil
    from d2v_scale.checkpoint import validate
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    try:
        run = disk / "run"
        proc = subprocess.Popen([sys.executable, "-m", "d2v_scale.cli", *train_args(image_shards, run, 12),
                                 "--run.save_every=6"], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not (run / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            free = shutil.disk_usage(disk).free
            with open(disk / "filler", "wb") as f:                # leaves 1 MiB: metrics rows fit, a checkpoint not
                f.write(b"\0" * (free - (1 << 20)))
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode not in (0, None), out[-3000:]
        tmp = run / "checkpoints" / "step_00000012.tmp"
        lines = [l for l in out.splitlines() if l.startswith("d2v: error:")]
        assert len(lines) == 1 and "Traceback" not in out, out[-4000:]
        assert f"no space left on the device writing checkpoint {tmp} (" in lines[0] and "MiB free of 48 MiB" in lines[0]
        assert f"the last complete checkpoint is {run / 'checkpoints' / 'step_00000006'}" in lines[0]
        assert not tmp.exists() and not list((run / "checkpoints").glob("*.tmp"))
        assert validate(run / "checkpoints" / "step_00000006") is None
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
