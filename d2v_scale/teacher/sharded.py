"""The partitioned EMA teacher: split exactly like a ZeRO-3 student, its state placed where
`--teacher.placement` says.

Every parameter is split into `world` equal flat chunks (ZeRO-3's per-parameter partitioning, zero
padded), so rank r's teacher slice and its fp32 master slice of the student are element for element
the same values. Each rank holds, for its slice, the fp32 EMA accumulators and the compute-precision
(bf16 on a GPU) weights the forward reads:

  placement              compute slice   fp32 accumulators   per optimizer step over PCIe
  host                   host (pinned)   host                slice up per pass + EMA streamed (10 B/elem)
  device_bf16_host_ema   device          host (pinned)       the fp32 accumulators down and back (8 B/elem)
  device                 device          device              nothing

The forward gathers one block at a time, like the student: this rank's slice (sent up from the host
for `host`) and the other ranks' (one all-gather per block), `prefetch` blocks ahead. `window`
computes the targets of every micro-batch of an accumulation window in one pass (block outer,
micro-batch inner), so each block is gathered once per optimizer step, not once per micro-step.
`block_results` yields each block's results to a model that builds its own targets (data2vec 1,
d2v1/model.py), gathering the same way.

The EMA is shard-local: rank r blends its own slice of the student's fp32 masters (ZeRO-3; the
matching chunk of a replicated student's weights under ZeRO-0/1/2) into its own accumulators and
writes the compute slice, once per applied optimizer step, with no collective (ema.py, over a few
contiguous runs laid out in the masters' order). On a GPU it runs on a side stream (or, all on the
host, in a host thread) beside the next step's work; every reader (the next pass, the kNN monitor
through `reading()`, checkpoints, exports) waits for it. Every host <-> device copy and every gather
is counted (`traffic`).

Rounding rule (both teachers): the accumulators start from the init rounded to the compute dtype (what
DeepSpeed builds the student's fp32 masters from) and blend the student's fp32 master under ZeRO-3,
its compute weights otherwise.

Checkpoints hold each rank's fp32 slices (`teacher_rank{r}.pt`, written and read by checkpoint.py), the
same files for every placement; slices of a flat chunking re-partition to any world size.
"""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as tdist
from torch import nn

from .ema import Blend, Traffic, coalesce, local_source, plan_layout, where
from .targets import teacher_copy, window_targets

PLACEMENTS = ("host", "device_bf16_host_ema", "device")


def local_slice(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s chunk of a flattened tensor split into `world` equal, zero-padded chunks
    (DeepSpeed ZeRO-3's per-parameter partitioning)."""
    n = math.ceil(flat.numel() / world)
    out = torch.zeros(n, dtype=flat.dtype, device=flat.device)
    part = flat[rank * n: (rank + 1) * n]
    out[: part.numel()] = part
    return out


def sides(placement: str, master_on_host: bool) -> dict[str, str]:
    """Where the EMA's source, the fp32 accumulators and the compute slice live."""
    return {"src": "host" if master_on_host else "device",
            "acc": "device" if placement == "device" else "host",
            "low": "host" if placement == "host" else "device"}


class ShardedTeacher:
    sharded = True       # checkpoints hold one file of fp32 slices per rank

    def __init__(self, model: nn.Module, cfg, dist, placement: str = "host", dtype: torch.dtype = torch.float32,
                 master_on_host: bool = False, asynchronous: bool | None = None, prefetch: int = 2):
        """`asynchronous`: the blend overlaps the next step's work (default: with a GPU); `prefetch`:
        blocks gathered ahead of the one running."""
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r}: one of {PLACEMENTS}")
        self.cfg, self.rank, self.world, self.device = cfg.model, dist.rank, dist.world, dist.device
        self.placement, self.dtype, self.prefetch = placement, dtype, prefetch
        self.cuda = self.device.type == "cuda"
        self.sides = sides(placement, master_on_host)
        self.module = teacher_copy(model.encoder)          # its parameters hold weights only while gathered
        params = list(self.module.parameters())
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = {n: tuple(p.shape) for n, p in zip(self.names, params)}
        self.params = params
        # the rounding rule: the init rounded to the compute dtype, this rank's slice of it
        init = [local_slice(p.detach().to(dtype).float().flatten(), self.rank, self.world) for p in params]
        self.fp32 = self._flat(init, torch.float32, self.sides["acc"])
        self.low = self.fp32 if self._shared() else self._flat(init, dtype, self.sides["low"])
        for p in params:                                    # nothing full is kept
            p.data = torch.empty(0, dtype=dtype, device=self.device)
        self.groups = _groups(self.names)                   # the blocks, then the rest
        self.block_of = {i: g for g, idx in enumerate(self.groups[:-1]) for i in idx}
        self.traffic = Traffic()
        self.updates = 0
        self.asynchronous = self.cuda if asynchronous is None else asynchronous
        self._plan_key, self.runs, self._pending = None, [], None
        self._blend: Blend | None = None
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[int, tuple] = {}               # group -> pending gather
        self._reading = False
        for g, blk in enumerate(self.module.blocks):        # readers' forwards gather block by block
            blk.register_forward_pre_hook(lambda m, a, g=g: self._acquire(g) if self._reading else None)
            blk.register_forward_hook(lambda m, a, o, g=g: self._release(g) if self._reading else None)

    def _shared(self) -> bool:
        return self.dtype == torch.float32 and self.sides["acc"] == self.sides["low"]

    def _on(self, side: str) -> torch.device:
        return self.device if side == "device" else torch.device("cpu")

    def _flat(self, values: list[torch.Tensor], dtype: torch.dtype, side: str, order=None) -> list[torch.Tensor]:
        """Views of one flat buffer on `side` (pinned host memory with a GPU), filled from `values`."""
        order = order if order is not None else range(len(values))
        pin = side == "host" and self.cuda
        flat = torch.empty(sum(v.numel() for v in values), dtype=dtype, device=self._on(side), pin_memory=pin)
        out, start = [None] * len(values), 0
        for i in order:
            out[i] = flat[start: start + values[i].numel()]
            out[i].copy_(values[i])
            start += values[i].numel()
        return out

    @property
    def encoder(self) -> nn.Module:
        """The teacher's module; its weights are in place only inside `reading()` or a pass."""
        return self.module

    # -- gathers -------------------------------------------------------------------------------
    def _start(self, g: int) -> None:
        """Begin gathering group g to the device: this rank's slice (sent up from the host for the
        `host` placement), then everyone's, asynchronously."""
        if g in self._inflight or g >= len(self.groups):
            return
        idx = self.groups[g]
        link = "pcie" if self.sides["low"] == "host" else None
        if not idx or (self.world == 1 and link is None):   # nothing to move (data2vec 1 text: blocks only)
            self._inflight[g] = (None, None)
            return
        k = sum(self.low[i].numel() for i in idx)
        send = torch.empty(k, dtype=self.dtype, device=self.device)
        start = 0
        for i in idx:
            self.traffic.move(send[start: start + self.low[i].numel()], self.low[i], link)
            start += self.low[i].numel()
        if self.world == 1:
            self._inflight[g] = (None, send.view(1, k))
            return
        out = send.new_empty(self.world, k)                                          # (world, k)
        work = tdist.all_gather(list(out.unbind(0)), send, async_op=True)
        self.traffic.bytes["gather"] += (self.world - 1) * k * send.element_size()
        self._inflight[g] = (work, out)

    def _acquire(self, g: int) -> None:
        """Put group g's full weights in place (waiting for its gather) and start the next ones."""
        self._start(g)
        for nxt in range(g + 1, min(g + 1 + self.prefetch, len(self.groups) - 1)):
            self._start(nxt)
        work, out = self._inflight[g]
        if work is not None:
            work.wait()
            self._inflight[g] = (None, out)
        start = 0
        for i in self.groups[g]:
            c = self.low[i].numel()
            flat = self.low[i] if out is None else out[:, start: start + c].reshape(-1)   # (world * c,)
            self.params[i].data = flat[: math.prod(self.shapes[self.names[i]])].view(self.shapes[self.names[i]])
            start += c

    def _release(self, g: int) -> None:
        work, _ = self._inflight.pop(g, (None, None))
        if work is not None:                                # a prefetch nobody used: let it land first
            work.wait()
        for i in self.groups[g]:
            self.params[i].data = torch.empty(0, dtype=self.dtype, device=self.device)

    @contextlib.contextmanager
    def _held(self, g: int):
        self._acquire(g)
        try:
            yield
        finally:
            self._release(g)

    @contextlib.contextmanager
    def reading(self):
        """The encoder with the latest blend in and its weights gathered as its forward runs (the
        non-block weights for the whole context, each block around its own forward): the kNN monitor
        and any other reader between steps. Collective when world > 1: every rank reads together."""
        self.wait()
        rest = len(self.groups) - 1
        self._acquire(rest)
        self._reading = True
        try:
            yield self.module
        finally:
            self._reading = False
            for g in list(self._inflight):
                self._release(g)
            self._release(rest)

    # -- targets -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, source: torch.Tensor, feats: torch.Tensor, padding_mask=None) -> torch.Tensor:
        return self.window([(source, feats, padding_mask)])[0]

    @torch.no_grad()
    def window(self, items: list[tuple]) -> list[torch.Tensor]:
        """(B, T, D) fp32 targets of each (source, feats, padding_mask), one gather of each block."""
        self.wait(host=False)                       # the previous step's EMA (on a GPU: the stream waits, not the host)
        rest = len(self.groups) - 1
        with self._held(rest):
            return window_targets(self.module, items, self.cfg, self.dtype, hold=self._held)

    @torch.no_grad()
    def block_results(self, embed):
        """Each block's (x, ffn) (B, E+T, D) in order, on the input `embed(encoder) -> (x, bias,
        padding_mask)` builds with the non-block weights in place (data2vec 1: d2v1/model.py runs the
        teacher's blocks through this). Each block is gathered around its own forward, `prefetch`
        ahead; the first one's gather starts before the embedding. Collective: every rank runs it."""
        self.wait(host=False)                       # the previous step's EMA
        rest = len(self.groups) - 1
        try:
            self._start(0)
            with self._held(rest):
                x, bias, pad = embed(self.module)
            for i, blk in enumerate(self.module.blocks):
                with self._held(i):
                    x, ffn = blk(x, bias, pad)                                        # (B, E+T, D) x2
                yield x, ffn
        finally:                                    # a consumer that stopped early leaves no gather behind
            for g in list(self._inflight):
                self._release(g)

    # -- EMA -----------------------------------------------------------------------------------
    def _plan(self, student_encoder: nn.Module) -> list:
        """The runs of the blend; on the first update (or when DeepSpeed moved a source) the teacher's
        fp32 accumulators and compute slices are laid out afresh in the sources' order."""
        student = dict(student_encoder.named_parameters())
        sources = [local_source(student[n], self.rank, a.numel()) for n, a in zip(self.names, self.fp32)]
        key = where(sources)
        if key == self._plan_key:
            return self.runs
        order = plan_layout(sources)
        fp32 = self._flat(self.fp32, torch.float32, self.sides["acc"], order)
        self.low = fp32 if self._shared() else self._flat(self.low, self.dtype, self.sides["low"], order)
        self.fp32 = fp32
        self.runs = coalesce(sources, self.fp32, [None] * len(order) if self._shared() else self.low)
        if self.cuda and self.runs and self.runs[0].src.is_cuda == (self.sides["src"] == "host"):
            self.sides["src"] = "device" if self.runs[0].src.is_cuda else "host"
        self._blend = Blend(self.device, self.sides, None if self._shared() else self.dtype, self.traffic)
        self._plan_key = key
        return self.runs

    @torch.no_grad()
    def update(self, student_encoder: nn.Module, decay: float) -> None:
        """theta_T <- decay * theta_T + (1 - decay) * theta_S on this rank's slices only (no collectives)."""
        self.wait()
        if decay >= 1.0:
            return
        self.updates += 1
        runs = self._plan(student_encoder)
        if self._stream is not None and self._blend.compute == "device":    # behind the optimizer step
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self._blend(runs, decay)
                self._pending = torch.cuda.Event()
                self._pending.record(self._stream)
            if not self.asynchronous:
                self.wait()
        elif self.asynchronous:                                             # all on the host
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-ema")
            self._pending = self._pool.submit(self._blend, runs, decay)
        else:
            self._blend(runs, decay)

    def wait(self, host: bool = True) -> None:
        """Block until the last update is blended (a no-op when it ran in the call). `host=False`: a
        device blend is only ordered before what the current stream does next."""
        pending, self._pending = self._pending, None
        if isinstance(pending, Future):
            pending.result()
        elif pending is not None and host:                                  # a CUDA event
            pending.synchronize()
        elif pending is not None:
            torch.cuda.current_stream(self.device).wait_event(pending)

    # -- state (checkpoint.py writes and reads the files) -----------------------------------------
    def state_dict(self) -> dict:
        """This rank's fp32 slices, with what re-splitting them needs."""
        self.wait()
        return {"world": self.world, "rank": self.rank, "shapes": self.shapes,
                "slices": {n: a.detach().cpu().clone() for n, a in zip(self.names, self.fp32)}}

    def load_slices(self, slices: dict[str, torch.Tensor]) -> None:
        """This rank's own slices, as `state_dict()["slices"]` of the same world size held them."""
        self._set({n: slices[n] for n in self.names})

    def load_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """From full (unpartitioned) fp32 tensors: an imported teacher, or another world size's."""
        missing = set(self.names) - set(full)
        if missing:
            raise KeyError(f"teacher state mismatch: missing {sorted(missing)[:5]}")
        self._set({n: local_slice(full[n].float().flatten(), self.rank, self.world) for n in self.names})

    @torch.no_grad()
    def _set(self, slices: dict[str, torch.Tensor]) -> None:
        self.wait()
        for n, a, low in zip(self.names, self.fp32, self.low):
            a.copy_(slices[n])
            if low.data_ptr() != a.data_ptr():
                low.copy_(a)

    def full_state(self) -> dict[str, torch.Tensor]:
        """All-gathered fp32 teacher (a collective: every rank must call it)."""
        self.wait()
        out = {}
        for n, a in zip(self.names, self.fp32):
            if self.world > 1:
                parts = [torch.empty_like(a) for _ in range(self.world)]
                tdist.all_gather(parts, a.contiguous())
                flat = torch.cat(parts)
            else:
                flat = a
            out[n] = flat[: math.prod(self.shapes[n])].view(self.shapes[n]).cpu().clone()
        return out


def _groups(names: list[str]) -> list[list[int]]:
    """Parameter indices per block (`blocks.3.*`, in order), then one group of everything else."""
    blocks: dict[int, list[int]] = {}
    rest = []
    for i, n in enumerate(names):
        parts = n.split(".")
        if parts[0] == "blocks":
            blocks.setdefault(int(parts[1]), []).append(i)
        else:
            rest.append(i)
    return [blocks[b] for b in sorted(blocks)] + [rest]
