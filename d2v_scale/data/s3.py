"""Remote shards and index files: S3-compatible object storage (boto3) and plain http(s).

Credentials, region and endpoint come from the standard AWS chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/config, AWS_ENDPOINT_URL or a
profile's `endpoint_url` for SeaweedFS, MinIO, Ceph ...). Nothing here prints or logs them.

`register()` installs `s3://`, `http://` and `https://` openers in webdataset's gopen scheme table
(no `pipe:` shell commands). They stream the object and, when the connection drops, reconnect with
a `Range: bytes=<offset>-` request and bounded retries with exponential backoff, so a shard resumes
where it broke instead of starting over; after the last retry the error reaches webdataset's
handler, which skips the rest of that shard and counts it.
"""
from __future__ import annotations

import io
import os
import sys
import time
import urllib.request
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlparse

import boto3
import webdataset  # noqa: F401 - its gopen module holds the scheme table
from botocore.config import Config
from botocore.exceptions import (ClientError, ConnectionError as BotoConnectionError, EndpointConnectionError,
                                 IncompleteReadError, NoCredentialsError, ReadTimeoutError, ResponseStreamingError)
from urllib3.exceptions import HTTPError as Urllib3Error

from ..errors import D2VError, has_url_credentials, url_credentials_refusal

RETRIES = int(os.environ.get("D2V_S3_RETRIES", "8"))           # reconnect attempts per failure
BACKOFF_S = float(os.environ.get("D2V_S3_BACKOFF", "0.5"))     # first wait; doubles, capped at 8 s

_clients: dict[int, object] = {}


class S3Error(D2VError, RuntimeError):
    """Object storage unreachable or misconfigured; the message says what to set."""


def client():
    """One boto3 client per process (boto3 clients must not cross a fork)."""
    pid = os.getpid()
    if pid not in _clients:
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        _clients[pid] = session.client(
            "s3", region_name=region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                          max_pool_connections=32))
    return _clients[pid]


def refuse_credentials(url: str, where: str = "a remote URL") -> None:
    """KEY:SECRET written into a URL would be echoed by every message and log that names the URL."""
    if has_url_credentials(url):
        raise S3Error(url_credentials_refusal(where))


def split_url(url: str) -> tuple[str, str]:
    refuse_credentials(url)
    p = urlparse(url)
    if p.scheme != "s3" or not p.netloc:
        raise S3Error(f"{url!r} is not an s3://bucket/key URL")
    return p.netloc, p.path.lstrip("/")


def explain(e: Exception, url: str) -> str:
    """A message naming the problem and the fix, with no credential material."""
    if has_url_credentials(url):
        return url_credentials_refusal("a remote URL")
    if isinstance(e, HTTPError):
        return f"{url}: HTTP {e.code} {e.reason}" + ("; no such object" if e.code == 404 else "")
    if isinstance(e, S3Error):
        return str(e)
    if isinstance(e, NoCredentialsError):
        return (f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "with a profile in ~/.aws/credentials")
    if isinstance(e, EndpointConnectionError):
        return (f"{url}: cannot reach the S3 endpoint ({e.kwargs.get('endpoint_url', '?')}); check AWS_ENDPOINT_URL "
                "and that the object store is running")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        bucket, key = split_url(url)
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and not key):
            return f"{url}: bucket {bucket!r} does not exist; create it or fix the URL"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{url}: no such object"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"{url}: access denied ({code}); check the credentials and the bucket policy"
        return f"{url}: S3 error {code}"
    return f"{url}: {type(e).__name__}: {e}"


def _transient(e: Exception) -> bool:
    if isinstance(e, HTTPError):
        return e.code >= 500
    if isinstance(e, S3Error):
        return False
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable")
    return isinstance(e, (BotoConnectionError, ReadTimeoutError, IncompleteReadError, ResponseStreamingError,
                          Urllib3Error, ConnectionError, OSError, IncompleteRead))


class IncompleteRead(IOError):
    pass


class RangeReader(io.RawIOBase):
    """A readable stream over one remote object that survives dropped connections (Range resume)."""

    def __init__(self, url: str, retries: int = RETRIES, backoff: float = BACKOFF_S):
        refuse_credentials(url)
        self.url, self.retries, self.backoff = url, retries, backoff
        self.pos, self.size, self.body = 0, None, None
        self.reconnects = 0
        self._with_retries(self._open)

    def _open(self) -> None:
        """Set self.body to a stream starting at self.pos (and self.size on the first call)."""
        raise NotImplementedError

    def _with_retries(self, fn):
        wait = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if not _transient(e) or attempt == self.retries:
                    raise S3Error(explain(e, self.url)) from None
                self.reconnects += 1
                print(f"s3: {self.url} at byte {self.pos}: {type(e).__name__}, retry {attempt + 1}/{self.retries} "
                      f"in {wait:.1f}s", file=sys.stderr, flush=True)
                time.sleep(wait)
                wait = min(wait * 2, 8.0)
                try:
                    self._open()
                except Exception:  # noqa: BLE001 - the next attempt reports it
                    self.body = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0

        def read():
            if self.body is None:
                self._open()
            data = self.body.read(len(b))
            if not data and self.size is not None and self.pos < self.size:
                self.body = None
                raise IncompleteRead(f"connection closed at byte {self.pos} of {self.size}")
            return data

        data = self._with_retries(read)
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001
                pass
            self.body = None
        super().close()


class S3Reader(RangeReader):
    def __init__(self, url: str, **kw):
        self.bucket, self.key = split_url(url)
        super().__init__(url, **kw)

    def _open(self) -> None:
        kw = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        resp = client().get_object(Bucket=self.bucket, Key=self.key, **kw)
        if self.size is None:
            self.size = int(resp["ContentLength"])
        self.body = resp["Body"]


class HTTPReader(RangeReader):
    def _open(self) -> None:
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-"} if self.pos else {})
        resp = urllib.request.urlopen(req, timeout=60)  # noqa: S310 - the user's own data URL
        if self.pos and resp.status != 206:
            resp.close()
            raise S3Error(f"{self.url}: the server ignores Range requests; cannot resume at byte {self.pos}")
        if self.size is None:
            self.size = int(resp.headers.get("Content-Length", 0)) or None
        self.body = resp


def gopen_remote(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    refuse_credentials(url, "a shard URL")
    if mode[0] != "r":
        raise S3Error(f"{url}: remote shards are read-only")
    reader = S3Reader(url) if url.startswith("s3://") else HTTPReader(url)
    return io.BufferedReader(reader, buffer_size=max(bufsize, 1 << 20))


def _refuse(url: str, *args, **kw):
    refuse_credentials(url, "a shard URL")
    raise S3Error(f"{url}: this URL scheme is not opened by d2v_scale (shards are local, s3:// or http(s)://; "
                  "pipe: only with --data.allow_pipe=true)")


_PIPE_OPENER = None


def register(allow_pipe: bool = False) -> None:
    """Make webdataset's gopen scheme table ours: s3/http/https through the Range-resuming readers,
    `pipe:` only when allowed, every other scheme (gs, ais, sftp, scp, hf: shell commands or network
    tools) refused. Forked DataLoader workers inherit the table."""
    global _PIPE_OPENER
    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    if _PIPE_OPENER is None:
        _PIPE_OPENER = schemes.get("pipe")
    for scheme in list(schemes):
        schemes[scheme] = _refuse
    for scheme in ("s3", "http", "https"):
        schemes[scheme] = gopen_remote
    if allow_pipe and _PIPE_OPENER is not None:
        schemes["pipe"] = _PIPE_OPENER


def read_bytes(url: str) -> bytes:
    """Whole contents of a small object (an index JSON): local path, file://, s3:// or http(s)://."""
    refuse_credentials(url)
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else url).read_bytes()
    if parsed.scheme == "s3":
        with S3Reader(url) as r:
            return r.read()
    if parsed.scheme in ("http", "https"):
        with HTTPReader(url) as r:
            return r.read()
    raise S3Error(f"unsupported URL scheme in {url!r}")


def list_objects(url: str, suffix: str = ".tar") -> list[str]:
    """Keys (not URLs) under s3://bucket/prefix/ that end with `suffix`, sorted."""
    bucket, prefix = split_url(url)
    keys, token = [], None
    try:
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/" if prefix else ""}
            if token:
                kw["ContinuationToken"] = token
            resp = client().list_objects_v2(**kw)
            keys += [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(suffix)]
            if not resp.get("IsTruncated"):
                break
            token = resp["NextContinuationToken"]
    except Exception as e:  # noqa: BLE001
        raise S3Error(explain(e, url)) from None
    return sorted(keys)


def list_shards(url: str) -> list[str]:
    """s3://bucket/prefix/ -> the .tar objects under it, sorted."""
    bucket, _ = split_url(url)
    return [f"s3://{bucket}/{k}" for k in list_objects(url)]


def read_head(url: str, n: int) -> bytes:
    """The first `n` bytes of a remote object (one ranged request)."""
    try:
        if url.startswith("s3://"):
            bucket, key = split_url(url)
            return client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{n - 1}")["Body"].read()
        req = urllib.request.Request(url, headers={"Range": f"bytes=0-{n - 1}"})
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - the user's own data URL
            return resp.read(n)
    except Exception as e:  # noqa: BLE001
        raise S3Error(explain(e, url)) from None


def head(url: str) -> int:
    """Size of an object, with the reason when it is not there."""
    bucket, key = split_url(url)
    try:
        return int(client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as e:  # noqa: BLE001
        msg = explain(e, url)
        if msg.endswith("no such object"):        # a HEAD 404 does not say whether the bucket exists
            try:
                client().head_bucket(Bucket=bucket)
            except Exception as e2:  # noqa: BLE001
                msg = explain(e2, f"s3://{bucket}/")
        raise S3Error(msg) from None


def where(url: str) -> str:
    """Where a shard is read from, for a message: the S3 endpoint (no credentials), the http(s) host, or
    the local folder."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        try:
            endpoint = client().meta.endpoint_url
        except Exception:  # noqa: BLE001 - a message must not fail
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
        return f"s3://{parsed.netloc}/ at endpoint {endpoint}"
    if parsed.scheme in ("http", "https"):
        return f"{parsed.scheme}://{parsed.hostname}{f':{parsed.port}' if parsed.port else ''}"
    return str(Path(parsed.path if parsed.scheme else url).parent)
