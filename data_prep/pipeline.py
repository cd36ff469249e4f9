"""The shared driver: encode items in worker processes (order preserved), write them in order.

Encoding (decode, resample, tokenize, re-encode) runs in `workers` processes through
`multiprocessing.Pool.imap`, which keeps the input order, so the shards are identical for any
worker count. A bad input is skipped and listed in a report written beside the index; it never
stops the run.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import random
import sys
from pathlib import Path

from tqdm import tqdm

from .sink import ShardSink


def _call(job):
    fn, key, args = job
    try:
        return key, fn(*args), None
    except Exception as e:  # noqa: BLE001 - reported per input, never fatal
        return key, None, f"{type(e).__name__}: {e}"


def shard(items: list[tuple], fn, dst: str, *, keys: list[str], maxcount: int, maxsize: float,
          workers: int, seed: int | None, desc: str, meta: dict | None = None, index: str | None = None,
          expand: bool = False) -> dict:
    """Write `fn(*item)` for every item to shards at `dst`; returns the index.

    `fn` returns one sample dict, or a list of them when `expand` (e.g. audio split into chunks).
    Items are shuffled with `seed` (None keeps the given order) so shards mix sources.
    """
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    jobs = [(fn, keys[i], items[i]) for i in order]
    errors, written = [], 0
    with ShardSink(dst, maxcount=maxcount, maxsize=maxsize, meta=meta, index=index) as sink:
        pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_call, jobs, chunksize=8) if pool else map(_call, jobs)
            bar = tqdm(results, total=len(jobs), desc=desc, unit="file", disable=not sys.stderr.isatty(),
                       mininterval=1.0)
            for key, out, err in bar:
                if err is not None:
                    errors.append({"input": key, "error": err})
                    continue
                for j, sample in enumerate(out if expand else [out]):
                    sample["__key__"] = f"{written:09d}"
                    sink.write(sample)
                    written += 1
                bar.set_postfix(samples=written, skipped=len(errors), refresh=False)
        finally:
            if pool:
                pool.terminate()
        sink.meta.update({"skipped_inputs": len(errors)})
    result = sink.index
    if errors:
        report = Path(_local_dir(sink.pattern)) / "skipped.json" if not sink.remote else None
        if report is not None:
            report.write_text(json.dumps(errors, indent=1) + "\n")
        result["skipped_report"] = str(report) if report else None
        result["errors"] = errors
    return result


def _local_dir(pattern: str) -> str:
    return pattern.rsplit("/", 1)[0] if "/" in pattern else "."
