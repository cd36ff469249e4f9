"""S3-compatible object storage for shards and index files, through boto3.

Credentials, region and endpoint come from the standard AWS chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/config, AWS_ENDPOINT_URL or a
profile's `endpoint_url` for SeaweedFS, MinIO, Ceph ...). Nothing here prints or logs them.

`register()` installs an `s3://` opener in webdataset's gopen scheme table (no `pipe:` shell
commands). The opener streams the object and, when the connection drops, reconnects with a
`Range: bytes=<offset>-` request and bounded retries with exponential backoff, so a shard resumes
where it broke instead of starting over; after the last retry the error reaches webdataset's
handler, which skips the rest of that shard and counts it.
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

RETRIES = int(os.environ.get("D2V_S3_RETRIES", "8"))           # reconnect attempts per failure
BACKOFF_S = float(os.environ.get("D2V_S3_BACKOFF", "0.5"))     # first wait; doubles, capped at 8 s

_clients: dict[int, object] = {}


class S3Error(RuntimeError):
    """Object storage unreachable or misconfigured; the message says what to set."""


def client():
    """One boto3 client per process (boto3 clients must not cross a fork)."""
    pid = os.getpid()
    if pid not in _clients:
        import boto3
        from botocore.config import Config
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        _clients[pid] = session.client(
            "s3", region_name=region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                          max_pool_connections=32))
    return _clients[pid]


def split_url(url: str) -> tuple[str, str]:
    p = urlparse(url)
    if p.scheme != "s3" or not p.netloc:
        raise S3Error(f"{url!r} is not an s3://bucket/key URL")
    return p.netloc, p.path.lstrip("/")


def explain(e: Exception, url: str) -> str:
    """A message naming the problem and the fix, with no credential material."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    if isinstance(e, NoCredentialsError):
        return (f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "with a profile in ~/.aws/credentials")
    if isinstance(e, EndpointConnectionError):
        return (f"{url}: cannot reach the S3 endpoint ({e.kwargs.get('endpoint_url', '?')}); check AWS_ENDPOINT_URL "
                "and that the object store is running")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket",):
            return f"{url}: bucket {split_url(url)[0]!r} does not exist; create it or fix the URL"
        if code in ("NoSuchKey", "404", "NotFound"):
            return f"{url}: no such object"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"{url}: access denied ({code}); check the credentials and the bucket policy"
        return f"{url}: S3 error {code}"
    return f"{url}: {type(e).__name__}: {e}"


def _transient(e: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, ReadTimeoutError
    from urllib3.exceptions import HTTPError as Urllib3Error
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable")
    return isinstance(e, (BotoConnectionError, ReadTimeoutError, Urllib3Error, ConnectionError, OSError,
                          IncompleteRead))


class IncompleteRead(IOError):
    pass


class S3Reader(io.RawIOBase):
    """A readable stream over one object that survives dropped connections (Range resume)."""

    def __init__(self, url: str, retries: int = RETRIES, backoff: float = BACKOFF_S):
        self.url, self.retries, self.backoff = url, retries, backoff
        self.bucket, self.key = split_url(url)
        self.pos, self.size, self.body = 0, None, None
        self.reconnects = 0
        self._with_retries(self._open)

    def _open(self) -> None:
        kw = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        resp = client().get_object(Bucket=self.bucket, Key=self.key, **kw)
        if self.size is None:
            self.size = int(resp["ContentLength"])
        self.body = resp["Body"]

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
            if not data and self.pos < self.size:
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


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode[0] != "r":
        raise S3Error(f"{url}: the s3 opener only reads")
    return io.BufferedReader(S3Reader(url), buffer_size=max(bufsize, 1 << 20))


def register() -> None:
    """Add `s3://` to webdataset's gopen scheme table (the module, not the re-exported function)."""
    import webdataset  # noqa: F401 - makes sure the module is loaded
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = gopen_s3


def read_bytes(url: str) -> bytes:
    """Whole contents of a small object (an index JSON): local path, file://, s3:// or http(s)://."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else url).read_bytes()
    if parsed.scheme == "s3":
        with S3Reader(url) as r:
            return r.read()
    if parsed.scheme in ("http", "https"):
        import urllib.request
        with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - the user's own data URL
            return r.read()
    raise S3Error(f"unsupported URL scheme in {url!r}")


def list_shards(url: str) -> list[str]:
    """s3://bucket/prefix/ -> the .tar objects under it, sorted."""
    bucket, prefix = split_url(url)
    keys, token = [], None
    try:
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/" if prefix else ""}
            if token:
                kw["ContinuationToken"] = token
            resp = client().list_objects_v2(**kw)
            keys += [o["Key"] for o in resp.get("Contents", []) if o["Key"].endswith(".tar")]
            if not resp.get("IsTruncated"):
                break
            token = resp["NextContinuationToken"]
    except Exception as e:  # noqa: BLE001
        raise S3Error(explain(e, url)) from None
    return [f"s3://{bucket}/{k}" for k in sorted(keys)]


def head(url: str) -> int:
    """Size of an object, with the reason when it is not there."""
    bucket, key = split_url(url)
    try:
        return int(client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as e:  # noqa: BLE001
        raise S3Error(explain(e, url)) from None
