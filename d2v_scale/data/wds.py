"""The WebDataset stream every rank reads, with an exactly resumable position.

Stages inside each DataLoader worker (rank r of R, worker w of W):
  shard order   -> `split`: this worker's shards (global worker r*W + w of R*W), reshuffled each pass,
                   or `resample`: shards drawn with replacement; both from Random(seed, epoch, r, w)
  tar samples   -> webdataset `tarfile_to_samples`; an unreadable shard is skipped and counted
  shuffle       -> a sample buffer driven by the same seeded Random
  skip          -> on resume, the samples this worker already delivered in this epoch (not decoded)
  decode        -> per-sample torch seed (seed, epoch, r, w, i) so augmentation replays exactly;
                   a sample that fails to decode is skipped with a warning and counted; a whole pass
                   over the worker's shards without one decodable sample stops the run with the reason
  batch         -> `batch_size` samples collated in the worker, then `prepare(batch, index)` (the
                   training step's masks, drawn ahead: masking.AheadMasks), index = the batch's place
                   in this rank's stream since the run began
Every worker yields the same number of batches per epoch and every rank the same number of
workers, so no rank runs short (the webdataset hang with uneven shards).
The DataLoader hands batches out round-robin over workers, so the number of batches the training
loop consumed fixes exactly what each worker has delivered: that count is the whole position.
"""
from __future__ import annotations

import ctypes
import os
import random
import signal
import threading
import time
import warnings

import torch
import webdataset as wds

from .s3 import where
from .shards import DataError

POLL_S = 2.0     # how often the training process looks up from a wait for a batch


class ErrorCounter:
    """webdataset exception handler: warn (rate-limited), count, continue."""

    def __init__(self, what: str, progress: dict | None = None):
        self.what, self.progress = what, progress
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if self.progress is not None:                  # the reason a stream that stops names
            self.progress["last_error"] = f"{exn}"[:300]
        if self.count <= 5 or self.count % 100 == 0:
            warnings.warn(f"skipping {self.what} ({self.count} so far): {exn!r:.300}", stacklevel=2)
        return True


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of batches for one rank; each DataLoader worker produces its own share."""

    def __init__(self, urls: list[str], *, rank: int, world: int, epoch: int, seed: int, batches: int,
                 batch_size: int, decode, collate, sampling: str, shuffle_buffer: int,
                 skip_batches: int = 0, num_workers: int = 1, prepare=None):
        super().__init__()
        self.urls, self.rank, self.world, self.epoch, self.seed = urls, rank, world, epoch, seed
        self.batches, self.batch_size, self.decode, self.collate = batches, batch_size, decode, collate
        self.prepare = prepare
        self.sampling, self.shuffle_buffer = sampling, shuffle_buffer
        self.skip_batches, self.num_workers = skip_batches, max(1, num_workers)

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shard_order(self, rng: random.Random, w: int, W: int, progress: dict):
        mine = self.urls if self.sampling == "resample" else self.urls[self.rank * W + w:: self.world * W]
        patience = max(2 * len(mine), 20)
        first = True
        progress.setdefault("read", 0)
        while True:
            if not first:                                  # samples read in the pass that just ended
                progress["last_pass"] = progress["read"] - progress["read_at_pass"]
                if progress["last_pass"] == 0 and progress.get("last_error"):   # no shard of a whole pass read
                    raise DataError(
                        f"worker {w} of rank {self.rank}: each of its {len(mine)} shards in {where(mine[0])} "
                        f"gave no sample in a whole pass (last: {progress.get('last_error') or 'no samples'}); "
                        f"{_fix(mine[0])}")
            progress["read_at_pass"], first = progress["read"], False
            order = [rng.choice(mine) for _ in mine] if self.sampling == "resample" else rng.sample(mine, len(mine))
            for url in order:
                if progress["opened"] - progress["opened_at_sample"] > patience:
                    raise DataError(f"worker {w} of rank {self.rank}: {patience} shards in a row gave no "
                                    f"sample (e.g. {url}); check the shards with `d2v-shard verify`")
                progress["opened"] += 1
                yield {"url": url}

    def __iter__(self):
        """Batches; a problem that stops the stream arrives as one {"error": message} item, so the
        training process reports the message itself (not a worker's traceback)."""
        try:
            yield from self._batches()
        except DataError as e:
            yield {"error": str(e)}

    def _batches(self):
        w, W = self._worker()
        w = (w + self.skip_batches) % W  # the DataLoader starts at its worker 0: rotate so that the
        torch.set_num_threads(1)         # worker owed the next batch (skip % W) is asked first
        rng = random.Random(hash((self.seed, self.epoch, self.rank, w)))
        n_batches = self.batches // W + (1 if w < self.batches % W else 0)        # round-robin share
        done = self.skip_batches // W + (1 if w < self.skip_batches % W else 0)   # already delivered
        progress = {"opened": 0, "opened_at_sample": 0, "read": 0, "read_at_pass": 0, "last_pass": 0}
        read_errors, decode_errors = ErrorCounter("unreadable shard", progress), ErrorCounter("undecodable sample")
        samples = wds.tarfile_to_samples(handler=read_errors)(self._shard_order(rng, w, W, progress))
        samples = _mark_progress(samples, progress)
        if self.shuffle_buffer > 1:
            samples = wds.filters._shuffle(samples, self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)
        index, buf, skipped, reported, failed_in_a_row = 0, [], 0, 0, 0
        for _ in range(done * self.batch_size):          # replay the consumed part without decoding
            next(samples)
            index += 1
        for sample in samples:
            if done >= n_batches:
                break
            torch.manual_seed(hash((self.seed, self.epoch, self.rank, w, index)) & 0xFFFF_FFFF_FFFF)
            index += 1
            try:
                buf.append(self.decode(sample))
                failed_in_a_row = 0
            except Exception as exn:  # noqa: BLE001 - a bad sample must not stop training
                if type(exn).__name__ != "TooShort":      # left out by the recipe: counted, not warned
                    decode_errors(ValueError(f"{sample.get('__url__')}:{sample.get('__key__')}: {exn}"))
                skipped, failed_in_a_row = skipped + 1, failed_in_a_row + 1
                if 0 < progress["last_pass"] <= failed_in_a_row:
                    raise DataError(
                        f"rank {self.rank} worker {w}: none of the last {failed_in_a_row} samples (a whole pass "
                        f"over this worker's shards) could be used, e.g. {sample.get('__url__')}: {exn}; the "
                        "shards do not fit this preset (another modality? see the index's 'modality' and "
                        "`d2v-shard verify`)") from None
                continue
            if len(buf) == self.batch_size:
                batch = self.collate(buf)
                if self.prepare is not None:         # this worker delivers epoch batches w, w + W, ...
                    batch = self.prepare(batch, self.epoch * self.batches + w + W * done)
                batch["skipped"] = torch.tensor(skipped)
                batch["read_errors"] = torch.tensor(read_errors.count - reported)
                reported = read_errors.count
                yield batch
                buf, skipped, done = [], 0, done + 1


def _fix(url: str) -> str:
    if "://" in url and not url.startswith("file://"):
        return "is the object store up and reachable? (AWS_ENDPOINT_URL, credentials, network)"
    return "check the shards with `d2v-shard verify`"


class DataStalled(DataError):
    """A stop signal arrived while the data source delivered nothing: the training loop checkpoints
    the last completed step instead of waiting for a batch that may never come."""


def init_worker(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGINT to the training process, which checkpoints and then ends them
    (launchers, Slurm and Ctrl-C signal every process of a rank, workers included). A SIGTERM sent by the
    training process itself (torch's and multiprocessing's terminate() at shutdown) still ends the
    worker, even one blocked in a read: a thread waits for the signal and checks who sent it. A training
    process that dies or exits without shutting its loader down takes its workers with it (Linux
    PR_SET_PDEATHSIG), so none is left reading."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})     # inherited by every thread after this

    def obey_parent_only() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=obey_parent_only, name="sigterm-from-parent", daemon=True).start()


def _die_with_parent() -> None:
    if not os.path.exists("/proc/self"):        # not Linux: no PR_SET_PDEATHSIG
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG


def _mark_progress(samples, progress: dict):
    for sample in samples:
        progress["opened_at_sample"] = progress["opened"]
        progress["read"] += 1
        yield sample


class Loader:
    """Endless iterator of batches for this rank with a resumable `state` (epoch, batches, samples)."""

    def __init__(self, urls: list[str], cfg, *, rank: int, world: int, seed: int, batch_size: int,
                 decode, collate, state: dict | None = None, prepare=None):
        self.urls, self.cfg, self.rank, self.world, self.seed = urls, cfg, rank, world, seed
        self.batch_size, self.decode, self.collate, self.prepare = batch_size, decode, collate, prepare
        W = max(1, cfg.num_workers)
        if cfg.sampling == "split" and len(urls) < world * W:
            raise DataError(
                f"{len(urls)} shards cannot be split over {world} ranks x {W} workers: make more shards "
                f"(d2v-shard --maxcount), use fewer --data.num_workers, or --data.sampling=resample")
        per_rank_batches = max(1, round(cfg.epoch_samples / batch_size / W)) * W
        self.batches_per_epoch = per_rank_batches
        self.state = {"epoch": 0, "batches": 0, "samples_seen": 0, "skipped": 0, "read_errors": 0}
        if state:
            self.state.update(state)
        self.start = self.state["epoch"] * per_rank_batches + self.state["batches"]   # a step boundary
        self.stop_pending = lambda: False     # the training loop's signals: a stop asked for while stalled

    def state_dict(self) -> dict:
        return dict(self.state)

    def _epoch_loader(self, epoch: int, skip: int):
        ds = ShardStream(self.urls, rank=self.rank, world=self.world, epoch=epoch, seed=self.seed,
                         batches=self.batches_per_epoch, batch_size=self.batch_size, decode=self.decode,
                         collate=self.collate, sampling=self.cfg.sampling,
                         shuffle_buffer=self.cfg.shuffle_buffer, skip_batches=skip,
                         num_workers=self.cfg.num_workers, prepare=self.prepare)
        return torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.cfg.num_workers, worker_init_fn=init_worker,
            persistent_workers=False, prefetch_factor=4 if self.cfg.num_workers > 0 else None,
            timeout=POLL_S if self.cfg.num_workers > 0 else 0,           # returns to `_next` while waiting
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context="fork" if self.cfg.num_workers > 0 and os.name == "posix" else None)

    def __iter__(self):
        while True:
            st = self.state
            if st["batches"] >= self.batches_per_epoch:
                st["epoch"], st["batches"] = st["epoch"] + 1, 0
            got = 0
            batches = iter(self._epoch_loader(st["epoch"], st["batches"]))
            try:
                while (batch := self._next(batches, first=got == 0)) is not None:
                    if "error" in batch:
                        raise DataError(batch["error"])
                    got += 1
                    st["batches"] += 1
                    st["samples_seen"] += self.batch_size
                    st["skipped"] += int(batch.pop("skipped"))
                    st["read_errors"] += int(batch.pop("read_errors"))
                    yield batch
            finally:                                    # closing this generator stops the workers now
                getattr(batches, "_shutdown_workers", lambda: None)()
            if got == 0:
                raise DataError(f"rank {self.rank} read no complete batch from {len(self.urls)} shards "
                                "(every shard unreadable or every sample undecodable?); see the warnings above")
            if st["batches"] < self.batches_per_epoch:
                raise DataError(f"rank {self.rank} ran out of samples mid-epoch; see the warnings above")

    def _next(self, batches, first: bool):
        """The next batch (None at the end of the epoch). While none arrives: a stop signal raises
        DataStalled (the loop checkpoints its last completed step), and `data.stall_timeout_s`
        without one stops the run naming where the shards are read from (not for an epoch's first
        batch: a resume replays its part of the epoch first, and an unreadable pass stops it anyway)."""
        t0 = time.monotonic()
        while True:
            try:
                return next(batches)
            except StopIteration:
                return None
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
            waited = time.monotonic() - t0
            if self.stop_pending():
                raise DataStalled(f"rank {self.rank}: no batch for {waited:.0f} s from {where(self.urls[0])}")
            if waited > self.cfg.stall_timeout_s and not first:
                raise DataError(
                    f"rank {self.rank}: no batch for {waited:.0f} s (--data.stall_timeout_s "
                    f"{self.cfg.stall_timeout_s:g}) from {where(self.urls[0])}: {_fix(self.urls[0])} (the "
                    "warnings above name the shards that failed)")

    def boundary_state(self, accumulation: int) -> dict:
        """The position at the last completed optimizer step: the micro-batches of a step left half
        done (gradient accumulation) are given back, so a resume replays them."""
        st = dict(self.state)
        pos = st["epoch"] * self.batches_per_epoch + st["batches"]
        back = (pos - self.start) % max(1, accumulation)
        st["epoch"], st["batches"] = divmod(pos - back, self.batches_per_epoch)
        st["samples_seen"] -= back * self.batch_size
        return st
