"""Upload finished shards to S3 in the background while the next ones are written.

Each shard is written locally (a temporary folder), uploaded with boto3's managed transfer
(multipart for large shards), and deleted. The bucket and the credentials are checked before
any input is read; the index object is put only after every shard upload succeeded.
"""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from d2v_scale.data.s3 import S3Error, client, explain, list_objects, split_url


class UploadError(S3Error):
    """The bucket cannot be written (missing, no credentials, refused); the message says what to set."""


class Uploader:
    def __init__(self, pattern: str, threads: int = 4):
        self.bucket, _ = split_url(pattern.replace("%", "0", 1) if "%" in pattern else pattern)
        try:
            client().head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - turned into the fix
            raise UploadError(explain(e, f"s3://{self.bucket}/")) from None
        self.tmpdir = tempfile.mkdtemp(prefix="d2v-shard-")
        self.pool = ThreadPoolExecutor(threads)
        self.futures = []
        self.bytes = 0
        self.seconds = 0.0

    def _upload(self, local: str, url: str) -> None:
        bucket, key = split_url(url)
        t0 = time.perf_counter()
        size = os.path.getsize(local)
        for attempt in range(4):
            try:
                client().upload_file(local, bucket, key)
                break
            except Exception as e:  # noqa: BLE001
                if attempt == 3:
                    raise UploadError(explain(e, url)) from None
                time.sleep(2 ** attempt)
        os.remove(local)
        self.bytes += size
        self.seconds += time.perf_counter() - t0

    def submit(self, local: str, url: str) -> None:
        self.futures.append(self.pool.submit(self._upload, local, url))

    def wait(self) -> None:
        for f in self.futures:
            f.result()          # re-raises the first failed upload
        self.futures = []

    def put_bytes(self, url: str, data: bytes) -> None:
        bucket, key = split_url(url)
        try:
            client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:  # noqa: BLE001
            raise UploadError(explain(e, url)) from None

    def list_names(self, folder_url: str) -> list[str]:
        """Names of the objects directly under s3://bucket/prefix/ (not in sub-prefixes)."""
        bucket, prefix = split_url(folder_url)
        return [k[len(prefix):] for k in list_objects(folder_url, suffix="") if "/" not in k[len(prefix):]]

    def delete(self, urls: list[str]) -> None:
        for i in range(0, len(urls), 1000):                # the S3 API's batch limit
            keys = [{"Key": split_url(u)[1]} for u in urls[i:i + 1000]]
            try:
                client().delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            except Exception as e:  # noqa: BLE001
                raise UploadError(explain(e, urls[i])) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        try:
            for name in os.listdir(self.tmpdir):
                os.remove(os.path.join(self.tmpdir, name))
            os.rmdir(self.tmpdir)
        except OSError:
            pass
