"""An interrupt at any moment of `d2v-shard` leaves complete shards and no `.partial`, and no index.

A Ctrl-C lands between two lines of Python wherever the process happens to be: opening a shard, closing
it, renaming it, hashing it, writing the index. The test delivers a KeyboardInterrupt at every line the
sharding code runs (the driver, the sink and webdataset's ShardWriter), one run per line, instead of
hoping a timed signal hits the narrow windows."""
import sys
import tarfile
from pathlib import Path

import webdataset

from data_prep import pipeline, sink
from data_prep.pipeline import shard

TRACED = {pipeline.__file__, sink.__file__, webdataset.writer.__file__}


def sample(i: int) -> dict:
    return {"txt": f"sample {i}".encode() * 20}


def run_interrupted_at(n: int, dst: Path) -> tuple[bool, int]:
    """Shard 8 inputs into shards of 2, raising KeyboardInterrupt at the n-th traced line (0: never).
    Returns (interrupted, traced lines run)."""
    lines = 0

    def local(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
            if lines == n:
                raise KeyboardInterrupt          # what a signal handler raises there; tracing stops with it
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename in TRACED else None)
    try:
        shard([(i,) for i in range(8)], sample, str(dst / "shard-%06d.tar"), keys=[str(i) for i in range(8)],
              maxcount=2, maxsize=1e9, workers=1, seed=0, desc="t")
    except KeyboardInterrupt:
        return True, lines
    finally:
        sys.settrace(None)
    return False, lines


def test_an_interrupt_at_any_line_leaves_no_partial_shard(tmp_path):
    _, total = run_interrupted_at(0, tmp_path / "full")
    assert (tmp_path / "full" / "index.json").exists() and total > 100
    for n in range(1, total + 1):
        out = tmp_path / f"at{n}"
        interrupted, _ = run_interrupted_at(n, out)
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert interrupted, n
        assert not [name for name in left if ".partial" in name], (n, left)
        if "index.json" in left:                    # interrupted after the index was in place: the run is done
            continue
        shards = [name for name in left if name != "d2v-shard.incomplete"]
        assert not shards or "d2v-shard.incomplete" in left, (n, left)   # a partial set says so
        for name in shards:                         # every shard on disk is complete
            with tarfile.open(out / name) as tf:
                assert len(tf.getmembers()) == 2, (n, name)   # 2 samples of one member each


def test_sigterm_cleans_up_as_ctrl_c_does(tmp_path):
    """A scheduler's or `kill`'s SIGTERM (workers running) ends `d2v-shard` as Ctrl-C does."""
    import signal
    import subprocess
    import time

    from d2v_scale.tools.demo_data import make_images
    from helpers import BIN, child_env
    src = make_images(tmp_path / "img", 100, size=32, seed=1)
    for png in list(src.glob("*/*.png")):                    # 3,000 inputs: the signal lands mid-run
        for k in range(29):
            (png.parent / f"{png.stem}_{k}.png").hardlink_to(png)
    out = tmp_path / "out"
    proc = subprocess.Popen([str(BIN / "d2v-shard"), "image", str(src), str(out), "--maxcount", "50", "--workers", "2"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shard-*.tar")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143
    assert not (out / "index.json").exists() and not list(out.glob("*.partial")), sorted(p.name for p in out.iterdir())
    assert list(out.glob("shard-*.tar"))
