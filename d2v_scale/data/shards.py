"""Which shards a run reads: `--data` -> checked shard URLs (+ the d2v-shard index when given one).

`--data` is a brace pattern, a directory of .tar, an index JSON written by `d2v-shard`, an
`s3://bucket/prefix/` listing, or s3/http(s) URLs. Every URL from every source passes the same
scheme check: local paths, file://, s3:// and http(s):// only; webdataset's `pipe:` URLs (they run a
shell command) only with `--data.allow_pipe=true`, and never from an index someone else wrote
without that flag. Shards that do not exist, objects missing from a bucket, files that are not tar
archives, an index made for another modality, a brace pattern of more than MAX_SHARDS names (counted,
not expanded) and a local folder that `d2v-shard` has not finished stop the run here, before any rank starts.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..errors import D2VError
from .braces import BraceError, expand
from .format import INCOMPLETE
from .s3 import HTTPReader, S3Error, list_objects, read_bytes, read_head, split_url

SCHEMES = ("", "file", "s3", "http", "https")
REMOTE = ("s3://", "http://", "https://")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")     # gzip, bzip2, xz: webdataset reads these tars too


class DataError(D2VError, ValueError):
    """Unusable data settings or shard lists, reported before training starts."""


@dataclass
class Shards:
    urls: list[str]
    index: dict = field(default_factory=dict)    # the d2v-shard index.json, when --data is one


def is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def local_path(url: str) -> Path:
    p = urlparse(url)
    return Path(p.path if p.scheme == "file" else url)


def check_url(url: str, allow_pipe: bool, source: str) -> str:
    """`url` if it may be opened; a DataError naming where it came from otherwise."""
    scheme = urlparse(url).scheme
    if scheme == "pipe":
        if allow_pipe:
            return url
        raise DataError(f"{source} lists {url!r}: a pipe: URL runs a shell command; pass --data.allow_pipe=true "
                        "only if you wrote that command yourself")
    if url == "-" or scheme not in SCHEMES:
        raise DataError(f"{source} lists {url!r}: shards must be local paths or file://, s3:// or http(s):// "
                        "URLs (fix the URL or the index)")
    return url


def find_shards(path: str, allow_pipe: bool = False) -> Shards:
    """Shard URLs (and index) from `--data`; raises DataError with the fix when there are none."""
    if not path:
        raise DataError("no data given: pass --data with shards, e.g. --data 'DIR/shard-{000000..000009}.tar', "
                        "a directory of .tar files, or an index JSON written by d2v-shard")
    check_url(path, allow_pipe, "--data")
    if path.endswith(".json"):
        if is_local(path):
            _check_finished(local_path(path).parent, path)
        index = read_index(path)
        base = path.rsplit("/", 1)[0] if "/" in path else "."
        urls = [check_url(_resolve(s["url"], base), allow_pipe, f"index {path}") for s in index["shards"]]
        shards = Shards(urls, index)
        if all(is_local(u) for u in urls):
            _check_local(urls, path)
        elif any(u.startswith("s3://") for u in urls):
            _check_s3([u for u in urls if u.startswith("s3://")], path)
        return shards
    if path.startswith(REMOTE):
        return Shards(_remote_urls(path, allow_pipe))
    if is_local(path) and local_path(path).is_dir():
        _check_finished(local_path(path), path)
        if (local_path(path) / "index.json").is_file():          # d2v-shard's folder: its index says what it holds
            return find_shards(str(local_path(path) / "index.json"), allow_pipe)
        urls = sorted(str(p) for p in local_path(path).glob("*.tar"))
        if not urls:
            raise DataError(f"--data {path}: the directory has no .tar shards; make some with `d2v-shard`")
        return Shards(urls)
    urls = [check_url(u, allow_pipe, f"--data {path}") for u in _expand(path)]
    _check_local([u for u in urls if is_local(u)], path)
    for folder in sorted({local_path(u).parent for u in urls if is_local(u)}):
        _check_finished(folder, path)
    return Shards(urls)


def _check_finished(folder: Path, source: str) -> None:
    """Refuse a folder that `d2v-shard` is still writing or was interrupted in: its marker is there, or
    a `.partial` shard without an index (left by a writer older than the marker)."""
    partial = sorted(p.name for p in folder.glob("*.tar.partial"))
    if (folder / INCOMPLETE).exists() or (partial and not (folder / "index.json").exists()):
        raise _unfinished(source, folder, INCOMPLETE if (folder / INCOMPLETE).exists() else partial[0])


def _unfinished(source: str, where, sign: str) -> DataError:
    return DataError(f"--data {source}: d2v-shard has not finished {where} ({sign} is there, its index.json comes "
                     "last): it was interrupted or still runs; rerun the same d2v-shard command with --overwrite "
                     "(or wait for it), then train on the folder")


def _expand(path: str) -> list[str]:
    try:
        return expand(path, "--data")
    except BraceError as e:
        raise DataError(str(e)) from None


def shard_list(path: str, allow_pipe: bool = False) -> list[str]:
    return find_shards(path, allow_pipe).urls


def _resolve(url: str, base: str) -> str:
    return url if "://" in url or url.startswith("/") or urlparse(url).scheme else f"{base}/{url}"


def read_index(path: str) -> dict:
    try:
        index = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise DataError(f"--data {path}: index file not found") from None
    except S3Error as e:
        raise DataError(f"--data: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path} is not a JSON index ({e}); give the index.json that d2v-shard wrote") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("url"), str) for s in shards):
        raise DataError(f"--data {path} is not a d2v-shard index (no 'shards' list of {{'url': ...}}); give the "
                        "index.json that d2v-shard wrote, a directory of .tar files or a brace pattern")
    if not shards:
        raise DataError(f"--data {path}: the index lists no shards")
    return index


def _check_local(urls: list[str], source: str) -> None:
    missing = [u for u in urls if not local_path(u).exists()]
    if missing:
        raise DataError(f"--data {source}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); "
                        "check the path and the {000000..000099} range")


def _check_s3(urls: list[str], source: str) -> None:
    """Every object exists: one listing per prefix instead of a request per shard."""
    by_prefix: dict[tuple[str, str], set[str]] = {}
    for u in urls:
        bucket, key = split_url(u)
        by_prefix.setdefault((bucket, key.rsplit("/", 1)[0] + "/" if "/" in key else ""), set()).add(key)
    for (bucket, prefix), keys in by_prefix.items():
        try:
            present = set(list_objects(f"s3://{bucket}/{prefix}", suffix=""))
        except S3Error as e:
            raise DataError(f"--data: {e}") from None
        if prefix + INCOMPLETE in present:
            raise _unfinished(source, f"s3://{bucket}/{prefix}", INCOMPLETE)
        missing = sorted(keys - present)
        if missing:
            raise DataError(f"--data {source}: {len(missing)} of {len(urls)} shards are not in the bucket "
                            f"(first: s3://{bucket}/{missing[0]}); check the prefix and the brace range")


def _remote_urls(path: str, allow_pipe: bool) -> list[str]:
    """s3://bucket/prefix/ (every .tar under it) or a brace pattern of s3/http(s) URLs; S3 objects must
    all exist and the first http shard must answer before training starts."""
    try:
        if path.endswith("/") and path.startswith("s3://"):
            bucket, prefix = split_url(path)
            keys = list_objects(path, suffix="")
            if prefix.rstrip("/") + "/" + INCOMPLETE in keys:
                raise _unfinished(path, path, INCOMPLETE)
            urls = [f"s3://{bucket}/{k}" for k in keys if k.endswith(".tar")]
            if not urls:
                raise DataError(f"--data {path}: no .tar objects under that prefix")
        else:
            urls = [check_url(u, allow_pipe, f"--data {path}") for u in _expand(path)]
            if any(u.startswith("s3://") for u in urls):
                _check_s3([u for u in urls if u.startswith("s3://")], path)
            http = [u for u in urls if u.startswith(("http://", "https://"))]
            if http:
                HTTPReader(http[0]).close()
    except S3Error as e:
        raise DataError(f"--data: {e}") from None
    return urls


def check_modality(shards: Shards, modality: str, source: str) -> None:
    """The index records what `d2v-shard` made; another modality's preset would skip every sample."""
    made = shards.index.get("modality")
    if made and made != modality:
        raise DataError(f"--data {source} holds {made} shards (its index says so) but the preset trains the "
                        f"{modality} encoder: pick a preset for {made} (e.g. --preset {_EXAMPLE[made]}) or other shards")


_EXAMPLE = {"image": "vit_base_patch16", "audio": "audio_base", "text": "text_base"}


def check_tar(url: str) -> None:
    """Raise DataError unless the shard starts like a tar archive (plain or gzip/bzip2/xz-compressed)."""
    try:
        head = local_path(url).open("rb").read(512) if is_local(url) else read_head(url, 512)
    except (OSError, S3Error) as e:
        raise DataError(f"shard {url} cannot be read: {e}") from None
    if head.startswith(_COMPRESSED):
        return
    try:
        tarfile.TarInfo.frombuf(head.ljust(512, b"\0"), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        raise DataError(f"shard {url} is not a tar archive (it does not start with a tar header); shards are "
                        "WebDataset .tar files: make them with `d2v-shard`") from None


def check_shards(shards: Shards, modality: str, source: str, every_local: bool = True) -> None:
    """Pre-flight of the shards themselves: the index's modality, and tar headers (every local shard,
    or only the first with every_local=False, plus the first remote one)."""
    check_modality(shards, modality, source)
    local = [u for u in shards.urls if is_local(u)]
    remote = [u for u in shards.urls if not is_local(u) and urlparse(u).scheme != "pipe"]
    for url in (local if every_local else local[:1]) + remote[:1]:
        check_tar(url)
