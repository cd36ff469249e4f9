"""Shards in a real S3 object store (SeaweedFS): sharding into it, verifying, streaming, failures."""
import json
import os
import subprocess

import pytest
import torch

from helpers import BIN, LAUNCH_ARGS, LAUNCH_STEPS, child_env, d2v_here, losses, run_d2v


def shard_cli(*args, env=None, check=True):
    res = subprocess.run([str(BIN / "d2v-shard"), *map(str, args)], env=env or child_env(), capture_output=True,
                         text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_shard_into_s3_and_verify(s3, s3_images):
    from d2v_scale.data.s3 import list_shards, read_bytes
    index = json.loads(read_bytes(s3_images))
    assert index["samples"] == 96 and all(s["url"].startswith("s3://d2v-test/img/") for s in index["shards"])
    assert len(list_shards("s3://d2v-test/img/")) == 8
    assert json.loads(read_bytes("s3://d2v-test/img/classes.json"))["circle"] == 0
    res = shard_cli("verify", s3_images, env=child_env(**s3.env()))
    assert res.stdout.strip().endswith("ok: 8 shards, 96 samples")


def test_verify_reports_a_damaged_shard(s3, s3_images):
    from d2v_scale.data.s3 import client, read_bytes
    c = client()
    index = json.loads(read_bytes(s3_images))
    broken = dict(index, shards=[dict(s) for s in index["shards"]])
    data = read_bytes(index["shards"][2]["url"])
    c.put_object(Bucket="d2v-test", Key="img-bad/s2.tar", Body=data[:-2048])
    broken["shards"][2]["url"] = "s3://d2v-test/img-bad/s2.tar"
    broken["shards"][5]["url"] = "s3://d2v-test/img-bad/missing.tar"
    c.put_object(Bucket="d2v-test", Key="img-bad/index.json", Body=json.dumps(broken).encode())
    res = shard_cli("verify", "s3://d2v-test/img-bad/index.json", env=child_env(**s3.env()), check=False)
    assert res.returncode == 1
    assert "img-bad/s2.tar: size" in res.stdout and "sha256 differs" in res.stdout
    assert "img-bad/missing.tar: cannot read" in res.stdout and "no such object" in res.stdout


def test_stream_from_s3_equals_local(s3, s3_images, image_shards):
    """Same shards from S3 and from disk give the same batches (the opener is byte-exact)."""
    from d2v_scale.data import build_loader
    from d2v_scale.presets import get_preset
    cfg = get_preset("vit_base_patch16_debug")
    cfg.data.num_workers, cfg.data.batch_size, cfg.data.epoch_samples = 2, 4, 48
    from d2v_scale.data.s3 import read_bytes
    remote = [s["url"] for s in json.loads(read_bytes(s3_images))["shards"]]
    from d2v_scale.data import shard_list
    local = shard_list(str(image_shards))        # the same images, seed and --maxcount: the same shards
    a, b = iter(build_loader(cfg, 0, 1, urls=remote)), iter(build_loader(cfg, 0, 1, urls=local))
    for _ in range(6):
        assert torch.equal(next(a)["source"], next(b)["source"])


def test_a_shard_that_keeps_failing_is_skipped_and_counted(s3, s3_images):
    """An index entry whose object is gone: the stream warns, counts it, and keeps delivering batches."""
    from d2v_scale.data import build_loader
    from d2v_scale.data.s3 import read_bytes
    from d2v_scale.presets import get_preset
    cfg = get_preset("vit_base_patch16_debug")
    cfg.data.num_workers, cfg.data.batch_size, cfg.data.epoch_samples = 0, 4, 48
    urls = [s["url"] for s in json.loads(read_bytes(s3_images))["shards"]][:2] + ["s3://d2v-test/img/gone.tar"]
    loader = build_loader(cfg, 0, 1, urls=urls)
    it = iter(loader)
    with pytest.warns(UserWarning, match="unreadable shard"):
        batches = [next(it) for _ in range(12)]
    assert all(b["source"].shape == (4, 3, 32, 32) for b in batches)
    assert loader.state["read_errors"] >= 1


def test_reader_resumes_with_range_after_a_restart(s3):
    from d2v_scale.data.s3 import S3Reader, client
    payload = os.urandom(24_000_000)
    client().put_object(Bucket="d2v-test", Key="blob/big.bin", Body=payload)
    reader = S3Reader("s3://d2v-test/blob/big.bin")
    head = reader.read(1_000_000)
    s3.restart(down_for=2)                       # the open connection dies; the server is back in seconds
    assert head + reader.read() == payload
    assert reader.reconnects >= 1


@pytest.mark.timeout(900)
def test_two_ranks_train_from_s3_through_a_server_restart(s3, s3_images, zero3_reference, tmp_path):
    """2 ranks stream from S3; the server is restarted mid-run. Training finishes, no shard is lost
    (data/unreadable_shards = 0), and the loss sequence equals the same run reading the same shards
    from disk (the launcher tests' reference): every sample arrived, in the same order."""
    import threading
    import time
    steps = LAUNCH_STEPS
    args = ["train", "--preset", "vit_base_patch16_debug", "--ds_config", "ds_configs/zero3.json", *LAUNCH_ARGS,
            "--run.peak_tflops=1"]
    restarted = {}

    def restart_when_running():
        metrics = tmp_path / "s3run" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                s3.restart(down_for=3)
                restarted["at_step"] = len(metrics.read_text().splitlines())
                return
            time.sleep(0.2)

    t = threading.Thread(target=restart_when_running)
    t.start()
    res = run_d2v(args + ["--data", s3_images, "--out", str(tmp_path / "s3run")], nproc=2,
                  env=child_env(**s3.env()), timeout=600)
    t.join()
    assert restarted.get("at_step", steps) < steps, "the restart came too late to hit the stream"
    assert "retry 1/" in res.stdout                              # the opener reconnected
    assert losses(tmp_path / "s3run") == losses(zero3_reference)
    last = json.loads((tmp_path / "s3run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/unreadable_shards"] == 0 and last["data/skipped_samples"] == 0
    assert s3.secret_key not in res.stdout                       # credentials are never printed


def test_clear_errors_for_missing_bucket_and_credentials(s3, image_dir, tmp_path):
    res = shard_cli("image", image_dir, "s3://no-such-bucket/x/s-%06d.tar", env=child_env(**s3.env()), check=False)
    assert res.returncode != 0 and "bucket 'no-such-bucket' does not exist" in res.stderr
    no_creds = {k: v for k, v in child_env(**s3.env()).items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    no_creds.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    res = shard_cli("image", image_dir, "s3://d2v-test/x/s-%06d.tar", env=no_creds, check=False)
    assert res.returncode != 0 and "no AWS credentials found" in res.stderr
    res = d2v_here(["train", "--preset", "vit_base_patch16_debug", "--data", "s3://no-such-bucket/s-{000000..000003}.tar",
                    "--out", str(tmp_path / "r")])                # the s3 fixture set this process's AWS_*
    assert res.returncode != 0 and "does not exist" in res.stdout
    assert s3.secret_key not in res.stdout


def test_stream_over_https_style_urls(image_shards, tmp_path):
    """Plain http(s) shard URLs go through the same Range-resuming opener (here a local http.server)."""
    import functools
    import http.server
    import threading
    from d2v_scale.data import DataError, build_loader, shard_list
    from d2v_scale.presets import get_preset

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 64                       # the loader opens shards from several processes

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(image_shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = shard_list(base + "/img-{000000..000007}.tar")
        cfg = get_preset("vit_base_patch16_debug")
        cfg.data.num_workers, cfg.data.batch_size, cfg.data.epoch_samples = 1, 4, 48
        remote, local = iter(build_loader(cfg, 0, 1, urls=urls)), iter(build_loader(cfg, 0, 1, urls=shard_list(str(image_shards))))
        for _ in range(4):
            assert torch.equal(next(remote)["source"], next(local)["source"])
        with pytest.raises(DataError, match="HTTP 404"):
            shard_list(base + "/nope-{000000..000001}.tar")
        remote.close()                                # stops its prefetching worker before the server goes
        local.close()
    finally:
        server.shutdown()
        server.server_close()


def test_resharding_into_a_prefix_needs_overwrite_and_removes_exactly_the_old(s3, image_dir):
    from d2v_scale.data.s3 import client, list_shards, read_bytes
    env = child_env(**s3.env())
    shard_cli("image", image_dir, "s3://d2v-test/re/img-%06d.tar", "--maxcount", 12, "--workers", 1, env=env)
    client().put_object(Bucket="d2v-test", Key="re/notes.txt", Body=b"mine")   # not a shard: untouched
    res = shard_cli("image", image_dir, "s3://d2v-test/re/img-%06d.tar", "--maxcount", 48, env=env, check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "already holds 8 shards of img-%06d.tar and an index: pass --overwrite" in res.stderr
    assert len(list_shards("s3://d2v-test/re/")) == 8
    shard_cli("image", image_dir, "s3://d2v-test/re/img-%06d.tar", "--maxcount", 48, "--overwrite", env=env)
    assert list_shards("s3://d2v-test/re/") == ["s3://d2v-test/re/img-000000.tar", "s3://d2v-test/re/img-000001.tar"]
    assert json.loads(read_bytes("s3://d2v-test/re/index.json"))["samples"] == 96
    assert read_bytes("s3://d2v-test/re/notes.txt") == b"mine"


def test_check_finds_missing_objects_of_a_brace_pattern_and_pipes_in_an_index(s3, s3_images, tmp_path):
    """`d2v check` in this process (the s3 fixture set its AWS_*)."""
    from d2v_scale.data.s3 import client, read_bytes
    args = ["--preset", "vit_base_patch16_debug", "--out", str(tmp_path / "r"), "--data.num_workers=1"]
    res = d2v_here(["check", *args, "--data", "s3://d2v-test/img/train-{000000..000009}.tar"])
    assert res.returncode != 0 and "Traceback" not in res.stdout
    assert "2 of 10 shards are not in the bucket (first: s3://d2v-test/img/train-000008.tar)" in res.stdout
    marker = tmp_path / "ran"
    index = json.loads(read_bytes(s3_images))
    index["shards"][1]["url"] = f"pipe:touch {marker}; cat /dev/null"
    client().put_object(Bucket="d2v-test", Key="evil/index.json", Body=json.dumps(index).encode())
    res = d2v_here(["check", *args, "--data", "s3://d2v-test/evil/index.json"])
    assert res.returncode != 0 and "pipe: URL runs a shell command" in res.stdout and not marker.exists()
    ok = d2v_here(["check", *args, "--data", "s3://d2v-test/img/train-{000000..000007}.tar"])
    assert ok.returncode == 0, ok.stdout
    assert "ok: vit_base_patch16_debug | 8 shards" in ok.stdout
