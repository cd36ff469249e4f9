"""Launchers on real parts: Slurm (sbatch + srun, requeue on USR1, scancel), the deepspeed launcher
with a hostfile (two launchers, one per "node", without ssh), and a rank killed mid-run."""
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import BIN, LAUNCH_ARGS as ARGS, LAUNCH_STEPS as STEPS, ROOT, child_env, run_d2v


def by_step(run_dir) -> dict[int, float]:
    """Loss per step; a step logged twice (re-run after a crash) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = d["train/loss"]
    return out


def wait_for_steps(run_dir, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = run_dir / "metrics.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"{run_dir} did not reach {n} steps")


@pytest.fixture(scope="module")
def reference(zero3_reference):
    """The uninterrupted 2-rank ZeRO-3 run every launcher must reproduce (one launch for the suite)."""
    return by_step(zero3_reference)


def sbatch(env, image_shards, out, *extra):
    env = dict(env, DATA=str(image_shards), PRESET="vit_base_patch16_debug", DS_CONFIG="ds_configs/zero3.json",
               OUT=str(out), BIN=str(BIN))
    res = subprocess.run(["sbatch", "--parsable", "-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "-o", str(out) + ".log", str(ROOT / "launcher/slurm/pretrain.sbatch"), *ARGS, *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_state(env, job):
    res = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def wait_state(env, job, states, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = job_state(env, job).get("JobState")
        if st in states:
            return st
        time.sleep(0.5)
    pytest.fail(f"job {job} never reached {states}")


@pytest.mark.timeout(900)
def test_sbatch_requeue_on_usr1_resumes_to_the_same_losses(slurm, image_shards, reference, tmp_path):
    out = tmp_path / "run"
    job = sbatch(slurm, image_shards, out)
    wait_for_steps(out, 8)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True, timeout=30)
    wait_state(slurm, job, {"PENDING"})                      # checkpointed, then requeued by rank 0
    assert job_state(slurm, job)["Restarts"] == "1"
    # Slurm holds a requeued batch job for 120 s before it is eligible again; release it now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True, timeout=30)
    wait_state(slurm, job, {"COMPLETED"}, timeout=600)
    log = (tmp_path / "run.log").read_text()
    assert "d2v job %s restart 0" % job in log and "d2v job %s restart 1" % job in log
    assert "SLURM_RESTART_COUNT=1" in log and "requeued Slurm job" in log
    stopped = int(log.split("stopped by a signal at step ")[1].split(";")[0])
    assert f"resumed from {out}/checkpoints/step_{stopped:08d} at step {stopped}" in log
    assert 0 < stopped < STEPS
    assert by_step(out) == reference                                 # every step, bit for bit
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


@pytest.mark.timeout(600)
def test_scancel_checkpoints_and_stops_then_resubmit_resumes(slurm, image_shards, reference, tmp_path):
    out = tmp_path / "run"
    job = sbatch(slurm, image_shards, out)
    wait_for_steps(out, 8)
    subprocess.run(["scancel", job], env=slurm, check=True, timeout=30)   # SIGTERM to every task
    wait_state(slurm, job, {"CANCELLED", "COMPLETED", "FAILED"})
    log = (tmp_path / "run.log").read_text()
    stopped = int(log.split("stopped by a signal at step ")[1].split(";")[0])
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert job_state(slurm, job).get("Restarts") == "0"               # cancelled jobs are not requeued
    job2 = sbatch(slurm, image_shards, out)
    wait_state(slurm, job2, {"COMPLETED"}, timeout=600)
    assert by_step(out) == reference


@pytest.mark.timeout(600)
def test_hostfile_two_nodes_without_ssh(image_shards, reference, tmp_path):
    """Two deepspeed launchers, one per host entry (NO_SSH=1, NODE_RANK 0 and 1), make one 2-rank job."""
    from d2v_scale.dist import free_port
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    env = child_env(HOSTFILE=str(hostfile), DATA=str(image_shards), PRESET="vit_base_patch16_debug",
               DS_CONFIG="ds_configs/zero3.json", OUT=str(tmp_path / "run"), BIN=str(BIN), NO_SSH="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([str(ROOT / "launcher/run_hostfile.sh"), *ARGS], cwd=ROOT,
                              env=dict(env, NODE_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=500)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "world 2" in outs[0]
    assert by_step(tmp_path / "run") == reference


@pytest.mark.timeout(600)
def test_killed_rank_ends_the_job_and_resume_continues(image_shards, reference, tmp_path):
    from d2v_scale.dist import free_port
    out = tmp_path / "run"
    args = ["train", "--preset", "vit_base_patch16_debug", "--data", str(image_shards), "--ds_config",
            "ds_configs/zero3.json", "--out", str(out), *ARGS, "--run.save_every=5"]
    launcher = subprocess.Popen([str(BIN / "deepspeed"), "--num_accelerators", "2", "--no_local_rank", "--master_port",
                                 str(free_port()), "--module", "d2v_scale.cli", *args], cwd=ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_steps(out, 12)
        import psutil
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "d2v_scale.cli" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        ranks[0].send_signal(signal.SIGKILL)
        t0 = time.time()
        log, _ = launcher.communicate(timeout=120)                 # the whole job ends; nothing hangs
        elapsed = time.time() - t0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0 and elapsed < 90
    assert "exits with return code = -9" in log and "lost contact with another rank" in log
    latest = (out / "checkpoints" / "latest").read_text()
    res = run_d2v(args + ["--resume", "auto"], nproc=2).stdout
    assert f"resumed from {out}/checkpoints/{latest}" in res
    assert by_step(out) == reference
