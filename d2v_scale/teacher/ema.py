"""The shard-local EMA's data path: this rank's student masters blended into its teacher slices over a
few contiguous runs, instead of one copy and two passes per tensor.

Plan (once the student engine exists, again if DeepSpeed moves its buffers): each teacher parameter's
source (the ZeRO-3 fp32 master partition, a view of the optimizer's flat group; or this rank's chunk of
a replicated student parameter) is located in its storage; the teacher's fp32 accumulators and
compute-precision slices are laid out in that order in one flat buffer each (pinned when there is a
GPU), so sources, accumulators and compute slices coalesce into runs that are each contiguous.

The blend `t = decay * t + (1 - decay) * s` (two elementwise ops per element, as torch's foreach path
does them) then runs where sources and accumulators are (`Blend`):
  * both on the host (an offloaded optimizer, host accumulators): in place over each run, and the
    compute slice written from it (and sent to the device when it lives there);
  * otherwise on the device: what lives on the host streams through in chunks (host accumulators
    down and back up: 8 bytes per element; sources down: 4), the compute slice is cast on the device.
Every host <-> device copy goes through `Traffic`, which counts its bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE_CHUNK = 1 << 23          # elements streamed through the device at a time (32 MB fp32)


def master_slice(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master of a ZeRO-3 parameter: a view of the optimizer's flat partition (what
    `deepspeed.utils.safe_get_local_fp32_param` returns, without its per-tensor stream sync and copy)."""
    opt = getattr(p, "_z3_optimizer", None)
    if opt is not None and hasattr(opt, "grad_position") and hasattr(opt, "fp32_partitioned_groups_flat"):
        group, offset, numel = opt.grad_position[opt.get_param_id(p)]
        return opt.fp32_partitioned_groups_flat[group].detach().narrow(0, offset, numel)
    from deepspeed.utils import safe_get_local_fp32_param
    return safe_get_local_fp32_param(p).detach()


def local_source(p: torch.nn.Parameter, rank: int, slice_numel: int) -> torch.Tensor:
    """The student values this rank's teacher slice (of `slice_numel` elements) tracks."""
    if hasattr(p, "ds_id"):                                                 # ZeRO-3: the fp32 master
        return master_slice(p)
    flat = p.detach().view(-1)                                              # replicated: this rank's chunk
    start = min(rank * slice_numel, flat.numel())
    return flat[start: start + slice_numel]


@dataclass
class Run:
    src: torch.Tensor                   # (n,) the student's values, on their device
    dst: torch.Tensor                   # (n,) fp32 accumulators (host)
    low: torch.Tensor | None            # (n,) compute-precision teacher slice (host), or None (dst is it)


def _where(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.storage_offset()


def where(sources: list[torch.Tensor]) -> list[tuple[int, int]]:
    """(storage, offset) of each source: the plan is redone when DeepSpeed moves one."""
    return [_where(s) for s in sources]


def plan_layout(sources: list[torch.Tensor]) -> list[int]:
    """The order to lay the teacher slices out in: by where their sources live (storage, offset)."""
    return sorted(range(len(sources)), key=lambda i: (_where(sources[i]), i))


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b starts where a ends, in the same storage."""
    return a.dtype == b.dtype and _where(a)[0] == _where(b)[0] and _where(b)[1] == _where(a)[1] + a.numel()


def coalesce(sources: list[torch.Tensor], dsts: list[torch.Tensor], lows: list[torch.Tensor | None]) -> list[Run]:
    """Runs over which source, accumulator and compute slice are each contiguous in memory."""
    runs: list[list[int]] = []
    for i in plan_layout(sources):
        if sources[i].numel() == 0:
            continue
        if runs:
            j = runs[-1][-1]
            n = sources[j].numel()
            if (dsts[j].numel() == n and _follows(sources[j], sources[i]) and _follows(dsts[j], dsts[i])
                    and (lows[i] is None or _follows(lows[j], lows[i]))):
                runs[-1].append(i)
                continue
        runs.append([i])
    out = []
    for idx in runs:
        n = sum(sources[i].numel() for i in idx)
        span = lambda t: t.as_strided((n,), (1,), t.storage_offset())      # noqa: E731
        first = idx[0]
        out.append(Run(span(sources[first]), span(dsts[first]), span(lows[first]) if lows[first] is not None else None))
    return out


def blend_host(runs: list[Run], decay: float) -> None:
    """t <- decay * t + (1 - decay) * s in place over every run (sources on the host), then the
    compute-precision slice."""
    for run in runs:
        run.dst.mul_(decay)
        run.dst.add_(run.src, alpha=1.0 - decay)
        if run.low is not None:
            run.low.copy_(run.dst)


class Traffic:
    """Bytes the teacher moves per link, counted where its code moves them: `pcie` (between host
    memory and the device) and `gather` (received from the other ranks). On a CPU run "host" and
    "device" are the same memory, but the code makes the same copies it makes on a GPU, so the
    counts are the GPU's (the tests compare them with `d2v plan`)."""

    def __init__(self):
        self.bytes = {"pcie": 0, "gather": 0}

    def move(self, dst: torch.Tensor, src: torch.Tensor, link: str | None) -> torch.Tensor:
        """dst <- src (same dtype), non-blocking where the memory allows; counted on `link`."""
        dst.copy_(src, non_blocking=True)
        if link is not None:
            self.bytes[link] += src.numel() * src.element_size()
        return dst

    def reset(self) -> dict[str, int]:
        out, self.bytes = dict(self.bytes), {"pcie": 0, "gather": 0}
        return out


class Blend:
    """t <- decay * t + (1 - decay) * s over runs whose parts live on either side: `sides` names the
    side ("host" or "device") of the sources (the student's masters), the fp32 accumulators and the
    compute-precision slices. The blend computes on the host when sources and accumulators are both
    there, else on the device, streaming what lives elsewhere through one chunk buffer each
    (accumulators down and back up, sources down, compute slices cast on the device and sent up)."""

    def __init__(self, device: torch.device, sides: dict[str, str], low_dtype: torch.dtype | None,
                 traffic: Traffic):
        self.sides, self.traffic = sides, traffic
        self.compute = "host" if sides["src"] == sides["acc"] == "host" else "device"
        where_ = torch.device("cpu") if self.compute == "host" else device
        buf = lambda dtype: torch.empty(DEVICE_CHUNK, dtype=dtype, device=where_)     # noqa: E731
        self.acc = buf(torch.float32) if sides["acc"] != self.compute else None
        self.src = buf(torch.float32) if sides["src"] != self.compute else None
        self.low = buf(low_dtype) if low_dtype is not None and sides["low"] != self.compute else None

    @torch.no_grad()
    def __call__(self, runs: list[Run], decay: float) -> None:
        move = self.traffic.move
        for run in runs:
            for i in range(0, run.dst.numel(), DEVICE_CHUNK):
                n = min(DEVICE_CHUNK, run.dst.numel() - i)
                a, s = run.dst[i: i + n], run.src[i: i + n]
                t = a if self.acc is None else move(self.acc[:n], a, "pcie")             # host -> device
                if self.src is not None:
                    s = move(self.src[:n], s, "pcie")
                t.mul_(decay)
                t.add_(s, alpha=1.0 - decay)
                if self.acc is not None:
                    move(a, t, "pcie")                                                    # device -> host
                if run.low is not None:
                    if self.low is None:
                        run.low[i: i + n].copy_(t)
                    else:
                        move(run.low[i: i + n], self.low[:n].copy_(t), "pcie")
