"""ShardSink: samples -> WebDataset tar shards (webdataset.ShardWriter) with an index written last.

Each shard is written to a `.partial` file and renamed (or uploaded) only once complete, and the
index JSON (shard URLs, sample counts, bytes, sha256) is written after every shard is in place,
so an interrupted run never leaves an index that points at a missing or half-written shard; the
destination (folder or prefix) holds `d2v-shard.incomplete` from the start until the index is in
place, so that the shards of an interrupted run are refused as `--data` instead of read as complete.
Tar members carry a fixed mtime, so the same input gives byte-identical shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import webdataset as wds

from d2v_scale.data.format import INCOMPLETE
from d2v_scale.errors import D2VError

from .s3_upload import Uploader, UploadError


class SinkError(D2VError, ValueError):
    """A destination that cannot be written; raised before any sample is processed."""


def normalize_pattern(dst: str) -> str:
    """`DIR` -> `DIR/shard-%06d.tar`; a pattern must contain one printf placeholder (`%06d`)."""
    if "%" not in dst:
        if dst.endswith(".tar"):
            raise SinkError(f"{dst}: the destination needs a shard number placeholder, e.g. {dst[:-4]}-%06d.tar")
        return dst.rstrip("/") + "/shard-%06d.tar"
    try:
        dst % 0
    except (TypeError, ValueError):
        raise SinkError(f"{dst}: use one printf placeholder for the shard number, e.g. shard-%06d.tar") from None
    return dst


def shard_regex(pattern: str) -> re.Pattern:
    """The file names a printf shard pattern produces: `img-%06d.tar` -> img-<6 or more digits>.tar."""
    name = pattern.rsplit("/", 1)[-1]
    m = re.search(r"%(0?)(\d*)d", name)
    if m is None:
        raise SinkError(f"{pattern}: use one printf placeholder for the shard number, e.g. shard-%06d.tar")
    digits = rf"\d{{{int(m[2])},}}" if m[1] and m[2] else r"\d+"
    return re.compile(re.escape(name[:m.start()]) + digits + re.escape(name[m.end():]) + r"(\.partial)?")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_local_dir(folder: Path) -> None:
    """Create the destination folder or say, in one line, why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SinkError(f"{folder}: a file is in the way of the destination folder; choose another destination") from None
    except OSError as e:
        raise SinkError(f"cannot create {folder} ({e.strerror}); choose a writable destination") from None
    if not os.access(folder, os.W_OK):
        raise SinkError(f"{folder} is not writable; choose a writable destination")


class ShardSink:
    """Context manager: `write(sample)`; on close, the index. `dst` is a local pattern or s3:// pattern."""

    def __init__(self, dst: str, maxcount: int = 10_000, maxsize: float = 1e9, index: str | None = None,
                 meta: dict | None = None, overwrite: bool = False):
        self.pattern = normalize_pattern(dst)
        self.remote = self.pattern.startswith("s3://")
        self.index_url = index or (self.pattern.rsplit("/", 1)[0] + "/index.json")
        if self.remote:
            try:
                self.uploader = Uploader(self.pattern)
            except UploadError as e:
                raise SinkError(str(e)) from None
            self.tmpdir = self.uploader.tmpdir
        else:
            parent = Path(self.pattern).parent
            _check_local_dir(parent)
            self.uploader = None
        self._clear_old_shards(overwrite)
        self.marker = self.pattern.rsplit("/", 1)[0] + "/" + INCOMPLETE   # until the index is in place:
        note = (f"d2v-shard is writing {self.pattern.rsplit('/', 1)[-1]} here, or was interrupted; "
                "index.json comes last\n")
        if self.remote:                                                  # `--data` refuses the folder
            self.uploader.put_bytes(self.marker, note.encode())
        else:
            Path(self.marker).write_text(note)
        self.meta = meta or {}
        self.shards: list[dict] = []
        self._files: dict[str, object] = {}
        self._partials: set[str] = set()     # `.partial` paths this sink may have created and not renamed
        self._count = 0
        self._limits = (maxcount, maxsize)
        self.writer = None              # made by the first write, inside `with`: its first shard is cleaned up

    def _old_outputs(self) -> list[str]:
        """Shards of this pattern (and leftovers of an interrupted run) and the index already there."""
        folder, index_name = self.pattern.rsplit("/", 1)[0], self.index_url.rsplit("/", 1)[-1]
        regex = shard_regex(self.pattern)
        if self.remote:
            names = self.uploader.list_names(folder + "/")
        else:
            names = [p.name for p in Path(folder).iterdir() if p.is_file()] if Path(folder).is_dir() else []
        old = sorted(n for n in names if regex.fullmatch(n))
        index = [index_name] if index_name in names and self.index_url.startswith(folder + "/") else []
        return [f"{folder}/{n}" for n in index + old]

    def _clear_old_shards(self, overwrite: bool) -> None:
        """Refuse a destination that already holds shards of this pattern or an index (a directory or
        prefix --data would train on the stale ones); with `overwrite` remove exactly those, index first."""
        old = self._old_outputs()
        if not old:
            return
        if not overwrite:
            shards = sum(1 for u in old if not u.endswith(".json"))
            raise SinkError(f"{self.pattern.rsplit('/', 1)[0]} already holds {shards} shards of "
                            f"{self.pattern.rsplit('/', 1)[-1]}{' and an index' if len(old) > shards else ''}: pass "
                            "--overwrite to replace them (exactly those files are removed), or choose another destination")
        if self.remote:
            self.uploader.delete(old)
        else:
            for path in old:
                os.remove(path)
        print(f"--overwrite: removed {len(old)} old files ({old[0].rsplit('/', 1)[-1]} ...)", flush=True)

    # ShardWriter hooks ----------------------------------------------------------------------
    def _local_path(self, fname: str) -> str:
        return str(Path(self.tmpdir) / Path(fname).name) if self.remote else fname

    def _open(self, fname: str):
        partial = self._local_path(fname) + ".partial"
        self._partials.add(partial)     # before it exists: an interrupt at any moment leaves it on the list
        f = open(partial, "wb")
        self._files[fname] = f
        return f

    def _finished(self, fname: str) -> None:
        self._files[fname].close()
        partial, final = self._local_path(fname) + ".partial", self._local_path(fname)
        if self._count == 0:            # ShardWriter opens the next shard eagerly; drop it if empty
            os.remove(partial)
        else:
            os.replace(partial, final)
        self._partials.discard(partial)  # only once it is gone: abort() removes what is still listed
        del self._files[fname]
        if self._count == 0:
            return
        record = {"url": fname, "samples": self._count, "bytes": os.path.getsize(final),
                  "sha256": sha256_file(final)}
        if self.remote:
            self.uploader.submit(final, fname)
        else:
            record["url"] = os.path.basename(fname)   # relative to the index
        self.shards.append(record)
        self._count = 0

    # API ----------------------------------------------------------------------------------------
    def write(self, sample: dict) -> None:
        if self.writer is None:         # ShardWriter opens its first shard as it is made
            self.writer = wds.ShardWriter(self.pattern, maxcount=self._limits[0], maxsize=self._limits[1],
                                          post=self._finished, opener=self._open, verbose=0, mtime=0.0)
        self.writer.write(sample)  # may finish the previous shard first (-> _finished resets _count)
        self._count += 1

    def write_extra(self, name: str, data: bytes) -> str:
        """A small file beside the shards (e.g. classes.json), written before the index."""
        url = self.pattern.rsplit("/", 1)[0] + "/" + name
        if self.remote:
            self.uploader.put_bytes(url, data)
        else:
            self._partials.add(url + ".partial")
            Path(url + ".partial").write_bytes(data)
            os.replace(url + ".partial", url)
            self._partials.discard(url + ".partial")
        return url

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.close()
        if self.remote:
            self.uploader.wait()
        index = {"format": "d2v_scale/shards-v1", **self.meta,
                 "samples": sum(s["samples"] for s in self.shards),
                 "bytes": sum(s["bytes"] for s in self.shards), "shards": self.shards}
        data = (json.dumps(index, indent=1) + "\n").encode()
        if self.remote:
            self.uploader.put_bytes(self.index_url, data)
            self.uploader.delete([self.marker])
            self.uploader.close()
        else:
            tmp = self.index_url + ".partial"
            self._partials.add(tmp)
            Path(tmp).write_bytes(data)
            os.replace(tmp, self.index_url)
            self._partials.discard(tmp)
            Path(self.marker).unlink(missing_ok=True)
        return index

    def abort(self) -> None:
        """Leave completed shards, remove every partial (open, being closed or renamed), write no index."""
        tar = getattr(self.writer, "tarstream", None)
        if tar is not None:             # let the tar stream go before its file (no flush into a closed file later)
            try:
                tar.close()
            except Exception:  # noqa: BLE001 - interrupted mid-sample: the file is removed below anyway
                pass
        for f in self._files.values():
            f.close()
        self._files.clear()
        for partial in sorted(self._partials):
            try:
                os.remove(partial)
            except FileNotFoundError:
                pass
        self._partials.clear()
        if self.remote:
            self.uploader.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.index = self.close()
        except BaseException:           # interrupted while the last shard or the index is written
            self.abort()
            raise
        return False
