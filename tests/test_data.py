"""The shard stream: shapes, exact resume, rank/worker split, corrupt samples and shards, clear errors."""
import gc
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from d2v_scale.data import DataError, build_loader, shard_list
from d2v_scale.presets import get_preset


def cfg_for(path, workers=1, batch=4, epoch=48, sampling="split"):
    cfg = get_preset("vit_base_patch16_debug")
    cfg.data.path, cfg.data.num_workers, cfg.data.batch_size = str(path), workers, batch
    cfg.data.epoch_samples, cfg.data.sampling, cfg.data.shuffle_buffer = epoch, sampling, 16
    return cfg


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_index_lists_all_shards_and_batches_have_the_right_shape(image_shards):
    index = json.loads((image_shards / "index.json").read_text())
    assert index["samples"] == 96 and len(index["shards"]) == 8
    assert all(len(s["sha256"]) == 64 for s in index["shards"])
    assert shard_list(str(image_shards / "index.json")) == shard_list(str(image_shards))
    cfg = cfg_for(image_shards / "index.json")
    batch = take(build_loader(cfg, 0, 1), 1)[0]
    assert batch["source"].shape == (4, 3, 32, 32) and batch["source"].dtype == torch.float32
    assert abs(float(batch["source"].mean())) < 1.5                      # ImageNet-normalised


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_replays_exactly(image_shards, workers):
    """Batches 5.. of an uninterrupted stream equal those of a stream resumed at batch 5 (and across
    an epoch boundary: 12 batches per epoch here)."""
    cfg = cfg_for(image_shards, workers=workers)
    full = [b["source"] for b in take(build_loader(cfg, 0, 1), 17)]
    resumed = build_loader(cfg, 0, 1, state={"epoch": 0, "batches": 5, "samples_seen": 20})
    for a, b in zip(full[5:], take(resumed, 12)):
        assert torch.equal(a, b["source"])


def test_ranks_and_workers_split_the_shards(image_shards):
    """Two ranks x two workers read disjoint shard sets covering all shards; every rank gets the
    same number of batches per epoch."""
    import random
    from d2v_scale.data.wds import ShardStream
    urls = shard_list(str(image_shards))
    read = {}
    for rank in (0, 1):
        for w in (0, 1):
            stream = ShardStream(urls, rank=rank, world=2, epoch=0, seed=1, batches=4, batch_size=4, decode=None,
                                 collate=None, sampling="split", shuffle_buffer=0)
            order = stream._shard_order(random.Random(0), w, 2, {"opened": 0, "opened_at_sample": 0})
            read[rank, w] = {next(order)["url"] for _ in range(8)}        # two passes over its shards
    assert sum(len(v) for v in read.values()) == len(urls)
    assert set().union(*read.values()) == set(urls)
    cfg = cfg_for(image_shards, workers=2, epoch=24)
    assert build_loader(cfg, 0, 2).batches_per_epoch == build_loader(cfg, 1, 2).batches_per_epoch


def test_too_few_shards_for_the_split(image_shards):
    with pytest.raises(DataError, match="cannot be split over 4 ranks x 4 workers"):
        build_loader(cfg_for(image_shards, workers=4), 0, 4)
    build_loader(cfg_for(image_shards, workers=4, sampling="resample"), 0, 4)   # resampling is fine


def test_missing_data_is_named(tmp_path):
    with pytest.raises(DataError, match="2 of 2 shards do not exist"):
        shard_list(str(tmp_path / "x-{000000..000001}.tar"))
    with pytest.raises(DataError, match="no .tar shards"):
        shard_list(str(tmp_path))
    with pytest.raises(DataError, match="no data given"):
        shard_list("")
    with pytest.raises(DataError, match="allow_pipe"):
        shard_list("pipe:cat x.tar")


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_sample_and_corrupt_shard_are_skipped_and_counted(image_shards, tmp_path):
    """A shard with a non-image sample and a truncated shard: training data still flows, both counted."""
    import shutil
    urls = shard_list(str(image_shards))
    shutil.copy(urls[0], tmp_path)                 # one good shard of 12: an epoch of 24 passes every shard
    good = (tmp_path / "img-000000.tar").read_bytes()
    _tar(tmp_path / "img-000100.tar", [("bad1.png", b"not a png"), ("bad2.png", b"\x89PNG broken")])
    (tmp_path / "img-000200.tar").write_bytes(good[: len(good) // 3])        # truncated mid-member
    with pytest.warns(UserWarning, match="skipping"):              # in-process: the warnings are visible
        take(build_loader(cfg_for(tmp_path, workers=0, epoch=48), 0, 1), 12)
    loader = build_loader(cfg_for(tmp_path, workers=1, epoch=24), 0, 1)   # counts cross the worker boundary
    batches = take(loader, 12)
    assert all(b["source"].shape == (4, 3, 32, 32) for b in batches)
    assert loader.state["skipped"] >= 2
    assert loader.state["read_errors"] >= 1


def test_all_shards_unreadable_stops_with_a_message(tmp_path):
    for i in range(2):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"garbage" * 100)
    loader = build_loader(cfg_for(tmp_path, workers=0), 0, 1)
    with pytest.raises(DataError, match="gave no sample"):
        with pytest.warns(UserWarning):
            take(loader, 1)


def test_exit_with_live_workers_does_not_hang(image_shards, tmp_path):
    """Workers ignore SIGTERM from others (the training process checkpoints first) but not the
    exit-time terminate() of their own process: a process that exits with a half-read loader exits."""
    script = tmp_path / "leave.py"
    script.write_text(f"""
from d2v_scale.data import build_loader
from d2v_scale.presets import get_preset
cfg = get_preset("vit_base_patch16_debug")
cfg.data.path, cfg.data.num_workers, cfg.data.batch_size = {str(image_shards)!r}, 2, 4
it = iter(build_loader(cfg, 0, 1))
next(it)
keep = [it]
keep.append(keep)          # a reference cycle: nothing frees the iterator before exit
""")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]


class _Stuck(torch.utils.data.IterableDataset):
    """A worker blocked for good, like one reading from a server that accepted and never answers."""
    def __iter__(self):
        time.sleep(3600)
        yield 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


def test_workers_ignore_others_sigterm_but_obey_their_training_process():
    """Slurm and launchers send SIGTERM to every process of a rank: workers must survive it so the
    training process can checkpoint. torch's own shutdown terminate() must still end a blocked one."""
    from d2v_scale.data.wds import init_worker
    loader = torch.utils.data.DataLoader(_Stuck(), batch_size=None, num_workers=1, worker_init_fn=init_worker,
                                         multiprocessing_context="fork")
    it = iter(loader)
    pid = it._workers[0].pid
    try:
        time.sleep(1.0)                                        # worker_init_fn has run
        subprocess.run(["kill", "-TERM", str(pid)], check=True)   # sent by another process: ignored
        time.sleep(1.0)
        assert _alive(pid)
        del it                                                  # DataLoader shutdown: join(5 s), then terminate()
        gc.collect()
        deadline = time.time() + 20
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        assert not _alive(pid)
    finally:                                                   # a regression fails here instead of hanging at exit
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
