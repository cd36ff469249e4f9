"""Shared fixtures: tiny image shards made on the fly, and runners for `d2v` / the deepspeed launcher.

Every test that starts ranks goes through `run_d2v`, which puts a wall-clock timeout on the whole
process group, so a hang fails the test instead of the suite.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_group(cmd: list[str], timeout: float, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Like subprocess.run(capture_output=True, text=True), but a timeout kills the whole process group
    (launcher, ranks, data-loader workers, object store), so nothing is left to slow later tests."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-4000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_d2v(args: list[str], nproc: int = 1, timeout: float = 240, cwd: Path = ROOT, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """`d2v ARGS` in one process, or under `deepspeed --num_accelerators N` when nproc > 1 (stderr in stdout)."""
    from d2v_scale.dist import free_port
    if nproc > 1:
        cmd = [str(BIN / "deepspeed"), "--num_accelerators", str(nproc), "--no_local_rank",
               "--master_port", str(free_port()), "--module", "d2v_scale.cli", *args]
    else:
        cmd = [sys.executable, "-m", "d2v_scale.cli", *args]
    res = run_group(cmd, timeout, cwd, env)
    result = subprocess.CompletedProcess(cmd, res.returncode, res.stdout + res.stderr, "")
    if check and res.returncode != 0:
        pytest.fail(f"exit {res.returncode}: {' '.join(cmd)}\n{result.stdout[-6000:]}")
    return result


def shm_segments() -> set[str]:
    """DeepSpeed CPU all-reduce segments of this user in /dev/shm (RAM: 69 MB per rank)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")} if shm.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def no_shm_left_behind():
    """A rank killed before it finished setting up keeps its segment; the suite removes what it made."""
    before = shm_segments()
    yield
    for name in shm_segments() - before:
        Path("/dev/shm", name).unlink(missing_ok=True)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["train/loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    from d2v_scale.demo_data import make_images
    return make_images(tmp_path_factory.mktemp("images"), 96, size=40)


@pytest.fixture(scope="session")
def image_shards(image_dir, tmp_path_factory) -> Path:
    """8 shards of 12 images (ImageNet layout) written by the real `d2v-shard image`."""
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([str(BIN / "d2v-shard"), "image", str(image_dir), str(out / "img-%06d.tar"),
                    "--maxcount", "12", "--workers", "2"], check=True, capture_output=True, env=_env())
    return out


TRAIN_ARGS = ["--preset", "vit_base_patch16_debug", "--data.num_workers=1", "--data.batch_size=4",
              "--run.log_every=1", "--optim.warmup_steps=2"]


def pytest_configure(config):
    # webdataset leaves the local file of a shard it stopped reading mid-way to the garbage collector
    config.addinivalue_line("filterwarnings", "ignore::ResourceWarning")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 endpoint: SeaweedFS on free loopback ports with bucket `d2v-test`, stopped by pid.
    The AWS variables point this process (and subprocesses given `s3.env()`) at it."""
    from d2v_scale.objectstore import SeaweedFS
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), buckets=("d2v-test",)).start()
    saved = {k: os.environ.get(k) for k in store.env()}
    os.environ.update(store.env())
    try:
        yield store
    finally:
        store.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Real English prose from this machine (license texts, stdlib docstrings), ~400 kB."""
    from d2v_scale.demo_data import make_corpus
    return make_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=400_000)


@pytest.fixture(scope="session")
def speech_dir(corpus_dir, tmp_path_factory) -> Path:
    """24 spoken sentences (espeak-ng at 22.05 kHz: d2v-shard resamples them to 16 kHz)."""
    from d2v_scale.demo_data import espeak, make_speech
    if espeak() is None:
        pytest.fail("espeak-ng is missing: `make test` installs it (apt-get install espeak-ng)")
    return make_speech(tmp_path_factory.mktemp("speech"), 24, corpus_dir)


@pytest.fixture(scope="session")
def spm_model(corpus_dir, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("spm") / "m"
    subprocess.run([str(BIN / "d2v-shard"), "spm-train", str(corpus_dir), str(prefix), "--vocab_size", "500"],
                   check=True, capture_output=True, env=_env())
    return Path(str(prefix) + ".model")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm cluster (slurmctld + slurmd + munged) from launcher/slurm/local_cluster.sh;
    yields the environment that points sbatch/squeue/scontrol at it; stopped by pid afterwards."""
    import shutil
    if not shutil.which("slurmctld") or os.geteuid() != 0:
        pytest.fail("Slurm tests need Debian's slurm-wlm and munge and root: `make test` installs them as root")
    state = tmp_path_factory.mktemp("slurm")
    script = ROOT / "launcher" / "slurm" / "local_cluster.sh"
    subprocess.run([str(script), "start", str(state)], check=True, capture_output=True, timeout=120)
    try:
        yield _env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=120)
