"""The shared driver: encode inputs in worker processes (order preserved), write samples in order.

Encoding (decode, resample, tokenize, re-encode) runs in `workers` processes through
`multiprocessing.Pool.imap`, which keeps the input order, so the shards are byte-identical for any
worker count. A bad input is skipped and listed in a report beside the index (`skipped.json`);
it never stops the run. Progress: a bar on a terminal, a line every 10% otherwise.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import random
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .sink import ShardSink


def _call(job):
    fn, key, args = job
    try:
        return key, fn(*args), None
    except Exception as e:  # noqa: BLE001 - reported per input, never fatal
        return key, None, f"{type(e).__name__}: {e}"


class One:
    """Default collector: each input gives one sample."""

    def feed(self, out, key):
        return [out]

    def finish(self):
        return []

    def stats(self) -> dict:
        return {}


class Chunks:
    """Each input gives (samples, dropped): audio split into chunks, too-short ones dropped."""

    def __init__(self):
        self.dropped = 0

    def feed(self, out, key):
        samples, dropped = out
        self.dropped += dropped
        return samples

    def finish(self):
        return []

    def stats(self) -> dict:
        return {"dropped_too_short": self.dropped}


class _Progress:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.next_pct, self.t0 = total, desc, 0, 10, time.time()
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="file", mininterval=0.5)

    def update(self, samples: int, skipped: int) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(samples=samples, skipped=skipped, refresh=False)
        elif self.total and 100 * self.n / self.total >= self.next_pct:
            print(f"{self.desc}: {self.n}/{self.total} inputs, {samples} samples, {skipped} skipped, "
                  f"{time.time() - self.t0:.0f}s", file=sys.stderr, flush=True)
            self.next_pct += 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def shard(items: list[tuple], fn, dst: str, *, keys: list[str], maxcount: int, maxsize: float, workers: int,
          seed: int | None, desc: str, meta: dict | None = None, index: str | None = None, collector=None,
          extras: dict[str, bytes] | None = None, overwrite: bool = False) -> dict:
    """Write the samples of `fn(*item)` for every item to shards at `dst`; returns the index.

    Items are shuffled with `seed` (None keeps the given order) so that shards mix sources.
    """
    collector = collector or One()
    order = list(range(len(items)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    jobs = [(fn, keys[i], items[i]) for i in order]
    errors, written = [], 0
    progress = _Progress(len(jobs), desc)
    sink = ShardSink(dst, maxcount=maxcount, maxsize=maxsize, meta=meta, index=index, overwrite=overwrite)
    try:                             # no file yet: the first sample opens the first shard
        with sink:
            pool = mp.get_context("fork").Pool(workers, signal.signal, (signal.SIGTERM, signal.SIG_DFL)) \
                if workers > 1 else None
            try:
                results = pool.imap(_call, jobs, chunksize=4) if pool else map(_call, jobs)
                for key, out, err in results:
                    if err is not None:
                        errors.append({"input": key, "error": err})
                    else:
                        for sample in collector.feed(out, key):
                            sample["__key__"] = f"{written:09d}"
                            sink.write(sample)
                            written += 1
                    progress.update(written, len(errors))
                for sample in collector.finish():
                    sample["__key__"] = f"{written:09d}"
                    sink.write(sample)
                    written += 1
            finally:
                progress.close()
                if pool:
                    pool.terminate()
            if written == 0:
                raise ValueError(f"no sample could be made from {len(jobs)} inputs; first error: "
                                 f"{errors[0]['error'] if errors else 'none'}")
            sink.meta.update({"inputs": len(jobs), "skipped_inputs": len(errors), **collector.stats()})
            for name, data in (extras or {}).items():
                sink.write_extra(name, data)
    except BaseException:            # interrupted anywhere, entering or leaving `with` too: no `.partial` stays
        sink.abort()
        raise
    result = sink.index
    if sink.uploader is not None:
        result["upload_mb_per_s"] = sink.uploader.bytes / 1e6 / max(sink.uploader.seconds, 1e-9)
    if errors:
        report = Path(sink.pattern.rsplit("/", 1)[0] if not sink.remote else ".") / (
            "skipped.json" if not sink.remote else "d2v-shard-skipped.json")
        report.write_text(json.dumps(errors, indent=1) + "\n")
        result["skipped_report"] = str(report)
        result["errors"] = errors
    return result
