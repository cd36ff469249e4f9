"""Shared fixtures: data made on the fly (images and their shards, prose, speech, a sentencepiece
model) and real services (a SeaweedFS S3 endpoint, a single-node Slurm cluster). Helpers the tests
import live in helpers.py; every test that starts ranks goes through its `run_d2v`, which puts a
wall-clock timeout on the whole process group, so a hang fails the test instead of the suite.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from d2v_scale.tools.demo_data import espeak, make_corpus, make_images, make_speech
from d2v_scale.tools.objectstore import SeaweedFS
from helpers import BIN, LAUNCH_ARGS, ROOT, ZERO2_ARGS, child_env, run_d2v, shm_segments


@pytest.fixture(scope="session", autouse=True)
def no_shm_left_behind():
    """A rank killed before it finished setting up keeps its segment; the suite removes what it made."""
    before = shm_segments()
    yield
    for name in shm_segments() - before:
        Path("/dev/shm", name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"), 96, size=40)


@pytest.fixture(scope="session")
def image_shards(image_dir, tmp_path_factory) -> Path:
    """8 shards of 12 images (ImageNet layout) written by the real `d2v-shard image`."""
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([str(BIN / "d2v-shard"), "image", str(image_dir), str(out / "img-%06d.tar"),
                    "--maxcount", "12", "--workers", "2"], check=True, capture_output=True, env=child_env())
    return out


@pytest.fixture(scope="session")
def zero2_run(image_shards, tmp_path_factory) -> Path:
    """One 1-rank ZeRO-2 run of 4 steps with checkpoints at steps 2 and 4 (ZERO2_ARGS). Never written
    to: test_safety works on copies, test_train compares the other ZeRO stages with it and resumes a
    copy rewound to step 2, test_eval's kNN-monitor run must give its losses."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    run_d2v(["train", "--data", str(image_shards), "--out", str(out), "--optim.max_steps=4", *ZERO2_ARGS])
    return out


@pytest.fixture(scope="session")
def zero3_reference(image_shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank ZeRO-3 run of LAUNCH_ARGS (the deepspeed launcher, one host): the losses
    every launcher, host layout and data source must reproduce. One launch serves all of them."""
    out = tmp_path_factory.mktemp("reference")
    run_d2v(["train", "--preset", "vit_base_patch16_debug", "--data", str(image_shards), "--ds_config",
             "ds_configs/zero3.json", "--out", str(out), *LAUNCH_ARGS, "--run.peak_tflops=1"], nproc=2, timeout=600)
    return out


def pytest_configure(config):
    # webdataset leaves the local file of a shard it stopped reading mid-way to the garbage collector
    config.addinivalue_line("filterwarnings", "ignore::ResourceWarning")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 endpoint: SeaweedFS on free loopback ports with bucket `d2v-test`, stopped by pid.
    The AWS variables point this process (and subprocesses given `s3.env()`) at it."""
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
def s3_images(s3, image_dir) -> str:
    """The test images sharded straight into the bucket by `d2v-shard image` (8 shards of 12, as
    image_shards on disk); their index URL."""
    res = subprocess.run([str(BIN / "d2v-shard"), "image", str(image_dir), "s3://d2v-test/img/train-%06d.tar",
                          "--maxcount", "12", "--workers", "2"], env=child_env(**s3.env()), capture_output=True,
                         text=True, timeout=300)
    assert "wrote 96 images in 8 shards" in res.stdout, res.stdout + res.stderr
    return "s3://d2v-test/img/index.json"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Real English prose from this machine (license texts, stdlib docstrings), ~400 kB."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=400_000)


@pytest.fixture(scope="session")
def speech_dir(corpus_dir, tmp_path_factory) -> Path:
    """24 spoken sentences (espeak-ng at 22.05 kHz: d2v-shard resamples them to 16 kHz)."""
    if espeak() is None:
        pytest.fail("espeak-ng is missing: `make test` installs it (apt-get install espeak-ng)")
    return make_speech(tmp_path_factory.mktemp("speech"), 24, corpus_dir)


@pytest.fixture(scope="session")
def spm_model(corpus_dir, tmp_path_factory) -> Path:
    prefix = tmp_path_factory.mktemp("spm") / "m"
    subprocess.run([str(BIN / "d2v-shard"), "spm-train", str(corpus_dir), str(prefix), "--vocab_size", "500"],
                   check=True, capture_output=True, env=child_env())
    return Path(str(prefix) + ".model")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm cluster (slurmctld + slurmd + munged) from launcher/slurm/local_cluster.sh;
    yields the environment that points sbatch/squeue/scontrol at it; stopped by pid afterwards."""
    if not shutil.which("slurmctld") or os.geteuid() != 0:
        pytest.fail("Slurm tests need Debian's slurm-wlm and munge and root: `make test` installs them as root")
    state = tmp_path_factory.mktemp("slurm")
    script = ROOT / "launcher" / "slurm" / "local_cluster.sh"
    subprocess.run([str(script), "start", str(state)], check=True, capture_output=True, timeout=120)
    try:
        yield child_env(SLURM_CONF=str(state / "slurm.conf"))
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=120)
