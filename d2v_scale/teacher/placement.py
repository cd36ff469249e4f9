"""Where the teacher lives: its bytes per rank (device, host) and what it moves per optimizer step
(PCIe, host memory, device memory, GPU-GPU gathers) for each placement, and `auto`'s choice: the
cheapest in traffic that fits. `d2v plan` prints these; the tests compare them with the bytes the
real teachers count (sharded.py's `traffic`).

t: the teacher's parameters; part = sum over parameters of ceil(n / world) (ZeRO-3's padded chunks);
lp: bytes of the compute dtype (2 bf16, 4 fp32); P: teacher passes per optimizer step (1 with the
window pass, the micro-steps without it). Per rank and optimizer step:
  replicated            gathers (world-1) part x 4 under ZeRO-3 (the EMA reads the fp32 masters)
  host                  PCIe P x part x lp (slice up per pass) + the EMA: 8 (accumulators down and
                        up) + lp under bf16 (compute slice up) per element; gathers P (world-1) part lp
  device_bf16_host_ema  PCIe 8 per element (the accumulators down and up); gathers as host
  device                no PCIe; gathers as host
With the optimizer offloaded (masters on the host) the host placements blend on the host (no PCIe
but the compute slice's lp for device_bf16_host_ema) and `device` reads the masters (4 per element).
"""
from __future__ import annotations

import math

PARTITIONED = ("device", "device_bf16_host_ema", "host")
ORDER = ("device", "replicated", "device_bf16_host_ema", "host")      # ties go to the first
LINKS = {"pcie": 45.0, "host": 20.0, "gpu": 1500.0, "gather": 150.0}    # GB/s per GPU, near an H100 box


def padded_part(numels: list[int], world: int) -> int:
    return sum(math.ceil(n / world) for n in numels)


def teacher_traffic(numels: list[int], world: int, passes: int, bf16: bool, placement: str, zero: int,
                    master_on_host: bool) -> dict[str, float]:
    """Per-rank bytes per optimizer step by link: pcie, host (host memory of a host blend), gpu
    (device memory of a device blend), gather (received from the other ranks)."""
    lp, t, part = (2 if bf16 else 4), sum(numels), padded_part(numels, world)
    blend = 8 + 12 + (6 if bf16 else 0)      # t *= decay (r+w t), t += w s (r t, r s, w t), low = t (r t, w low)
    out = {"pcie": 0.0, "host": 0.0, "gpu": 0.0, "gather": 0.0}
    if placement == "replicated":
        if zero >= 3:
            out["gather"] += (world - 1) * part * 4
        out["gpu"] += t * blend
        return out
    out["gather"] += passes * (world - 1) * part * lp
    if placement == "host":
        out["pcie"] += passes * part * lp
    if master_on_host and placement != "device":
        out["host"] += part * blend
        out["pcie"] += part * lp if placement == "device_bf16_host_ema" else 0
    else:
        out["gpu"] += part * blend
        if placement == "device":
            out["pcie"] += part * 4 if master_on_host else 0
        else:
            out["pcie"] += part * (8 + (lp if bf16 and placement == "host" else 0))
    return out


def teacher_memory(numels: list[int], block_numel: int, world: int, bf16: bool, placement: str,
                   prefetch: int = 2) -> dict[str, dict[str, int]]:
    """Per-rank bytes of the teacher: {"device": {...}, "host": {...}}."""
    lp, t, part = (2 if bf16 else 4), sum(numels), padded_part(numels, world)
    if placement == "replicated":
        dev = {"teacher": lp * t}
        if bf16:
            dev["teacher fp32 accumulators"] = 4 * t
        return {"device": dev, "host": {}}
    dev, host = {}, {}
    acc = dev if placement == "device" else host
    low = host if placement == "host" else dev
    low["teacher compute slice"] = lp * part
    if bf16 or acc is not low:                   # fp32 with both on one side: the slice is the accumulator
        acc["teacher fp32 slice"] = 4 * part
    if world > 1 or placement == "host":          # gathered blocks: the running one and the prefetched ones
        dev["teacher live blocks"] = lp * min(t, (1 + prefetch) * block_numel)
    return {"device": dev, "host": host}


def link_seconds(traffic: dict[str, float], links: dict[str, float] = LINKS) -> dict[str, float]:
    return {k: v / (links[k] * 1e9) for k, v in traffic.items()}


def choose(traffic: dict[str, dict[str, float]], device_need: dict[str, float], device_bytes: float,
           links: dict[str, float] = LINKS) -> str:
    """The cheapest placement in link time whose device bytes fit `device_bytes`; `host` if none does."""
    fits = [p for p in ORDER if p in traffic and device_need[p] <= device_bytes]
    if not fits:
        return "host"
    return min(fits, key=lambda p: (sum(link_seconds(traffic[p], links).values()), ORDER.index(p)))
