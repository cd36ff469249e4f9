"""Training metrics: TensorBoard scalars, rank-0 progress, throughput and MFU, the end-of-run summary
(with the newest evaluation values: the kNN monitor's eval/*, fine-tuning's val/*).

Per-step values are kept as local sums and reduced across ranks once per log interval (one small
all-reduce), not every step. MFU counts the model FLOPs of a data2vec 2.0 step (see `flops.py`)
against a per-rank peak: `run.peak_tflops`, or the best of a few GEMM sizes measured at start-up.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .d2v import mean_std
from .dist import all_reduce_sum, device_scalar


def _gemm_rate(n: int, device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10:
            continue
        sync()
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# square GEMM sizes tried; the best rate is the peak (a GPU reaches its rate only at large shapes: an
# H100 reads ~17% low at 4096^3; a CPU's best size depends on its caches and threads)
PEAK_SIZES = {"cuda": (4096, 8192, 12288), "cpu": (512, 1024, 2048)}


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Sustained matmul FLOP/s of this process on `device` (fp32 on CPU, bf16 on GPU): the best rate of
    a few square GEMM sizes (PEAK_SIZES), each timed for `seconds` / len(sizes). An upper bound to
    hold model FLOP/s against only as far as the sizes reach the machine's rate; an efficiency above
    1 means the peak was under-measured (`efficiency_text` says so instead of printing it)."""
    sizes = PEAK_SIZES["cuda" if device.type == "cuda" else "cpu"]
    return max(_gemm_rate(n, device, dtype, seconds / len(sizes)) for n in sizes)


def efficiency_text(value: float) -> str:
    """An efficiency (a fraction of the measured peak) as a percentage; above 100% it is no efficiency
    but a peak measured too low, and says so."""
    return f"{value:.1%}" if value <= 1 else f"{value:.0%}?! peak under-measured"


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of steps <= last_step in `path`; append the others to metrics.superseded.jsonl
    beside it (nothing is lost). Returns how many rows moved."""
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:          # a row cut short by a killed run
            step = last_step + 1
        (keep if step <= last_step else moved).append(line)
    if moved:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.write("".join(line + "\n" for line in moved))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
    return len(moved)


class Metrics:
    def __init__(self, out_dir: Path, is_main: bool, world: int, start_step: int, stop_step: int,
                 peak_flops: float, progress: bool = True):
        self.is_main, self.world = is_main, world
        self.peak_flops = peak_flops
        self.writer, self.jsonl = None, None
        if is_main:
            # steps after the one resumed from are trained again: TensorBoard hides their old events,
            # metrics.jsonl moves their old rows aside, so neither keeps two rows for one step
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)
            moved = truncate_jsonl(out_dir / "metrics.jsonl", start_step)
            if moved:
                print(f"metrics.jsonl: {moved} rows of steps after {start_step} (trained again now) moved to "
                      "metrics.superseded.jsonl", flush=True)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")   # one line per log step
        self.bar = None
        if is_main and progress and sys.stderr.isatty():
            self.bar = tqdm(total=stop_step, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._reset()
        self.start_step, self.t_start = start_step, time.perf_counter()
        self.history: list[tuple[int, float]] = []
        self.last: dict = {}
        self.last_eval: dict = {}     # the newest evaluation values (eval/*, val/*), for the summary

    def _reset(self) -> None:
        self.sums = None      # on the compute device: loss (summed), loss_cls (summed), masked tokens
        self.samples = 0
        self.flops = 0.0
        self.stats = None
        self.t0 = time.perf_counter()

    def update(self, out: dict, batch_size: int, flops: float) -> None:
        """After every micro-step: accumulate this rank's sums (no synchronisation)."""
        self.flops += flops
        loss = out["loss"].detach().double()
        vec = torch.stack([loss, out["loss_cls"].detach().double() if "loss_cls" in out else loss * 0,
                           device_scalar(out["sample_size"], loss.device, loss.dtype)])
        self.sums = vec if self.sums is None else self.sums + vec
        self.samples += batch_size
        self.stats = (out["pred_stats"], out["target_stats"])

    def log(self, step: int, lr: float, ema_decay: float, extra: dict | None = None) -> dict:
        """Reduce the window across ranks (all ranks call this) and write the scalars."""
        pred, target = self.stats
        vec = torch.cat([self.sums.cpu(), torch.tensor([self.samples, self.flops], dtype=torch.float64),
                         pred.detach().cpu(), target.detach().cpu()])
        if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
            vec = all_reduce_sum(vec.cuda()).cpu()
        else:
            vec = all_reduce_sum(vec)
        loss_sum, cls_sum, tokens, samples, flops = vec[:5].tolist()
        n = pred.numel()
        dt = time.perf_counter() - self.t0
        sps = samples / max(dt, 1e-9)
        m = {"train/loss": loss_sum / max(tokens, 1), "train/loss_cls": cls_sum / max(tokens, 1),
             "train/lr": lr, "train/ema_decay": ema_decay,
             "train/pred_var": float(mean_std(vec[5:5 + n])), "train/target_var": float(mean_std(vec[5 + n:])),
             "perf/samples_per_s": sps,
             "perf/mfu": flops / max(dt, 1e-9) / self.world / self.peak_flops if self.peak_flops else 0.0}
        m.update(extra or {})
        self.record(step, m)
        if self.is_main:
            msg = (f"step {step} loss {m['train/loss']:.4f} lr {lr:.2e} tau {ema_decay:.6f} "
                   f"pred_var {m['train/pred_var']:.3f} target_var {m['train/target_var']:.3f} "
                   f"{sps:.1f} samples/s mfu {efficiency_text(m['perf/mfu'])}")
            if self.bar is not None:
                self.bar.set_postfix_str(msg.split(" ", 2)[2][:80])
            else:
                print(msg, flush=True)
        self._reset()
        return m

    def record(self, step: int, m: dict) -> None:
        """A log row with `train/loss`: written, and kept for the summary."""
        self.last = m
        self.history.append((step, m["train/loss"]))
        self.scalars(step, m)

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of this window's throughput."""
        self.t0 += seconds

    def scalars(self, step: int, values: dict) -> None:
        """Write values of a step (TensorBoard + one metrics.jsonl row) on rank 0; evaluation values
        (eval/*, val/*) are kept for the summary."""
        self.last_eval.update({k: v for k, v in values.items() if k.startswith(("eval/", "val/"))})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self, step: int, out_dir: Path, checkpoint: str | None, extra: dict | None = None) -> dict:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
        elapsed = time.perf_counter() - self.t_start
        first = next((l for _, l in self.history if math.isfinite(l)), float("nan"))
        summary = {"steps": step - self.start_step, "final_step": step, "elapsed_s": round(elapsed, 1),
                   "first_loss": first, "final_loss": self.last.get("train/loss", float("nan")),
                   "samples_per_s": self.last.get("perf/samples_per_s", 0.0),
                   "mfu": self.last.get("perf/mfu", 0.0), "tensorboard": str(out_dir / "tb"),
                   "checkpoint": checkpoint}
        summary.update({k.split("/", 1)[1] if k.startswith("eval/") else k.replace("/", "_"): v
                        for k, v in self.last_eval.items()})
        summary.update(extra or {})
        if self.is_main:
            print("\n== d2v_scale run summary ==")
            for k, v in summary.items():
                print(f"  {k:>14}: {v:.4f}" if isinstance(v, float) else f"  {k:>14}: {v}")
        return summary
