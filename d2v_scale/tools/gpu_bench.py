"""The GPU check as one command (`launcher/gpu_bench.sh` installs the wheels, then runs this): each
configuration in its own process under its own timeout, the next one starting whatever the last one
did, and one table at the end, the goals first.

  python -m d2v_scale.tools.gpu_bench [--out runs/gpu_bench] [--budget_s 420] [--tiny] [--only NAME,...]

Rows: P1 data2vec 2.0 ViT-H / timm ViT-H efficiency (model FLOPs, same process; goal >= 0.85);
P2 ZeRO-3 with the host-offloaded teacher / ZeRO-2 step time at micro batch 32, with 1 and with 4
micro-steps (goal <= 1.3x), and its EMA exposed (the run with the EMA off beside; goal <= 5%); P3 ZeRO-3
with the replicated teacher / ZeRO-2 (goal <= 1.15x); the EMA paths' exactness on the device
(overlapped blend vs not: bit-identical teachers); one micro-step under CUDA's sync debug mode
("error"); peak device and pinned host memory of each configuration. `--tiny`: the same code paths
with the debug presets at micro batch 2 on whatever device there is (CPU), to test the driver.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    name: str
    argv: list[str]                    # after `python`
    timeout_s: float
    result: dict = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0


def configs(tiny: bool, out: Path) -> list[Run]:
    """The runs, most important first (the budget may end the list early)."""
    py = [sys.executable]
    if tiny:
        image, peer, mb, steps = "vit_base_patch16_debug", "2", "2", ["--steps", "1", "--warmup", "1"]
        t = 420
    else:
        image, peer, mb, steps = "vit_huge_patch14", "64", "32", ["--steps", "5", "--warmup", "2"]
        t = 150
    bench = [*py, "-m", "d2v_scale.cli", "bench", "step", "--preset", image, f"--data.batch_size={mb}", *steps,
             "--model.grad_checkpointing=true"]

    def step(name: str, ds: str, gas: int, *extra: str, timeout: float = t) -> Run:
        return Run(name, [*bench, "--ds_config", f"ds_configs/{ds}.json", f"--data.global_batch={int(mb) * gas}",
                             *extra, "--json_out", str(out / f"{name}.json")], timeout)

    return [
        step("zero2_mb_timm", "zero2", 1, "--compare", "timm", "--peer_batch_size", peer, timeout=t * 1.5),
        step("zero3_sharded", "zero3", 1, "--teacher.placement=sharded"),
        step("zero2_gas4", "zero2", 4),
        step("zero3_sharded_gas4", "zero3", 4, "--teacher.placement=sharded", timeout=t * 1.5),
        step("zero3_replicated", "zero3", 1, "--teacher.placement=replicated"),
        Run("ema_exact", [*py, "-m", "d2v_scale.tools.gpu_bench", "ema_exact", "--out", str(out)], t),
        Run("sync_step", [*py, "-m", "d2v_scale.tools.gpu_bench", "sync_step", "--out", str(out),
                             "--preset", "vit_base_patch16_debug" if tiny else "vit_base_patch16"], t),
    ]


NAMES = ("zero2_mb_timm", "zero3_sharded", "zero2_gas4", "zero3_sharded_gas4", "zero3_replicated", "ema_exact",
         "sync_step")


def run(cfg: Run, deadline: float, log: Path) -> None:
    """One configuration in its own process group, killed at its timeout or at the overall deadline."""
    limit = min(cfg.timeout_s, deadline - time.monotonic())
    if limit < 20:
        cfg.status = "skipped (budget spent)"
        return
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cfg.argv) + "\n")
        f.flush()
        proc = subprocess.Popen(cfg.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            cfg.status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            cfg.status = f"timed out ({limit:.0f} s)"
    cfg.seconds = time.monotonic() - t0
    path = log.with_suffix(".json")
    if path.exists():
        cfg.result = json.loads(path.read_text())
    if cfg.status != "ok":
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        cfg.status += f": {tail[0][-100:]}"


def _ratio(a: Run, b: Run, key: str = "step_s") -> float | None:
    x, y = a.result.get(key), b.result.get(key)
    return x / y if x and y else None


def table(runs: dict[str, Run]) -> list[tuple[str, str, str, str]]:
    """(row, value, goal, verdict) in order of importance."""
    rows = []
    runs = {**{n: Run(n, [], 0) for n in NAMES}, **runs}

    def add(name, value, goal=None, ok=None, fmt="{:.3f}"):
        text = "not measured" if value is None else (fmt.format(value) if not isinstance(value, str) else value)
        verdict = "" if value is None or ok is None else ("PASS" if ok(value) else "FAIL")
        rows.append((name, text, goal or "", verdict))

    p1 = runs["zero2_mb_timm"].result.get("efficiency_ratio")
    add("P1 d2v2 / timm efficiency (model FLOPs)", p1, ">= 0.85", lambda v: v >= 0.85)
    z2, z2g = runs["zero2_mb_timm"], runs["zero2_gas4"]
    add("P2 ZeRO-3 host teacher / ZeRO-2, 1 micro-step", _ratio(runs["zero3_sharded"], z2), "<= 1.3",
        lambda v: v <= 1.3)
    add("P2 ZeRO-3 host teacher / ZeRO-2, 4 micro-steps", _ratio(runs["zero3_sharded_gas4"], z2g), "<= 1.3",
        lambda v: v <= 1.3)
    for name in ("zero3_sharded", "zero3_sharded_gas4"):
        add(f"P2 EMA exposed ({name})", runs[name].result.get("ema_exposed"), "<= 5%", lambda v: v <= 0.05,
            "{:+.1%}")
    add("P3 ZeRO-3 replicated teacher / ZeRO-2", _ratio(runs["zero3_replicated"], z2), "<= 1.15",
        lambda v: v <= 1.15)
    exact = runs["ema_exact"].result
    add("EMA overlapped vs not: bit-identical teacher", None if not exact else
        ("yes" if exact.get("identical") else f"no (max diff {exact.get('maxdiff')})"), "yes", lambda v: v == "yes")
    sync = runs["sync_step"].result
    add("one micro-step without host sync", None if not sync else ("yes" if sync.get("ok") else sync.get("error", "no")[:60]),
        "yes", lambda v: v == "yes")
    for name, c in runs.items():
        if "device_peak_gb" in c.result:
            add(f"memory {name}: device peak / pinned host GB",
                f"{c.result['device_peak_gb']:.1f} / {c.result['pinned_host_gb']:.1f}")
    for name, c in runs.items():
        add(f"run {name}", f"{c.status} ({c.seconds:.0f} s)")
    return rows


def print_table(rows, note: str = "") -> None:
    w = max(len(r[0]) for r in rows)
    print("\n== GPU check ==" + (f" ({note})" if note else ""))
    for name, value, goal, verdict in rows:
        print(f"  {name:<{w}}  {value:<28} {goal:<8} {verdict}")


def run_all(runs: list[Run], budget_s: float, out_dir: Path, note: str = "") -> list[tuple[str, str, str, str]]:
    """Each run in turn (a failed or timed-out one does not stop the next), then the table."""
    deadline = time.monotonic() + budget_s
    for c in runs:
        print(f"-- {c.name} (timeout {min(c.timeout_s, max(0.0, deadline - time.monotonic())):.0f} s)", flush=True)
        run(c, deadline, out_dir / f"{c.name}.log")
        print(f"   {c.status} in {c.seconds:.0f} s", flush=True)
    rows = table({c.name: c for c in runs})
    print_table(rows, note)
    (out_dir / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def main(out: str = "runs/gpu_bench", budget_s: float = 420, tiny: bool = False, only: str = "") -> None:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = only if isinstance(only, (list, tuple)) else [n for n in str(only).split(",") if n]   # fire: a,b -> tuple
    picked = [c for c in configs(tiny, out_dir) if not names or c.name in names]
    run_all(picked, budget_s, out_dir, "TINY: debug presets, the driver tested; the verdicts judge no goal" if tiny else "")
    sys.exit(0 if all(c.status == "ok" for c in picked) else 1)


# -- the two checks that are not `bench step` -----------------------------------------------------

def ema_exact(out: str) -> None:
    """The sharded teacher trained with the EMA blended beside the next step and blended in place, same
    seed and batches (the tests' EMA probe): the two teachers bit-identical, each exact to the
    closed-form EMA."""
    out_dir = Path(out)
    res, teachers = {}, {}
    import torch
    for overlap in ("true", "false"):
        prefix = out_dir / f"ema_{overlap}"
        subprocess.run([sys.executable, str(ROOT / "tests" / "probes" / "ema_probe.py"), str(prefix), "sharded",
                        str(ROOT / "ds_configs" / "zero3.json"), overlap], cwd=ROOT, check=True)
        res[overlap] = json.loads(prefix.with_suffix(".json").read_text())
        teachers[overlap] = torch.load(str(prefix) + ".teacher.pt", weights_only=True)
    a, b = teachers["true"], teachers["false"]
    identical = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    maxdiff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    (out_dir / "ema_exact.json").write_text(json.dumps({"identical": identical, "maxdiff": maxdiff,
                                                         "exact_overlapped": res["true"]["exact"],
                                                         "exact_inline": res["false"]["exact"]}) + "\n")
    print(f"EMA overlapped vs inline: identical {identical} (max diff {maxdiff})")


def sync_step(out: str, preset: str = "vit_base_patch16") -> None:
    """Warm-up micro-steps, then one non-boundary micro-step (student forward, teacher targets, loss,
    backward) under torch.cuda.set_sync_debug_mode("error") on a GPU, under HostSyncCheck on CPU. When
    it raises, the boundary micro-step runs again under "warn" and every synchronising call site is
    listed (the step's own and DeepSpeed's optimizer step)."""
    import torch

    from .. import dist as dist_mod
    from ..config import with_vocab
    from ..data import synthetic_batch
    from ..engine import build_engine
    from ..masking import AheadMasks
    from ..presets import build_config
    from ..train import train_step
    from .host_sync import HostSyncCheck
    cfg, ds_over = build_config(preset, None, ds_config="ds_configs/zero2.json", **{"data.batch_size": 4})
    cfg.data.global_batch = 8
    with_vocab(cfg)
    dist = dist_mod.init()
    built = build_engine(cfg, dist, ds_overrides=ds_over)
    masks = AheadMasks(cfg, dist.rank, 2)
    pin = (lambda b: {k: v.pin_memory() for k, v in b.items()}) if dist.device.type == "cuda" else dict
    batches = [pin(masks(dict(synthetic_batch(cfg)), k)) for k in range(3)]
    for k in range(2):
        train_step(built.engine, built.teacher, batches[k], cfg, 0, k, dist, built.dtype)
    result = {"ok": True, "device": str(dist.device)}
    try:
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                train_step(built.engine, built.teacher, batches[2], cfg, 1, 0, dist, built.dtype)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with HostSyncCheck(dist.device, host=[t for b in batches for t in b.values()]):
                train_step(built.engine, built.teacher, batches[2], cfg, 1, 0, dist, built.dtype)
    except RuntimeError as e:
        result = {"ok": False, "device": str(dist.device), "error": str(e).splitlines()[0][:300]}
        if dist.device.type == "cuda":       # every synchronising call of the next micro-step, by where
            import warnings
            sites = set()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    train_step(built.engine, built.teacher, batches[2], cfg, 1, 1, dist, built.dtype)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            for w in caught:
                if "synchroniz" in str(w.message):
                    sites.add(f"{w.filename}:{w.lineno}")
            result["sites"] = sorted(sites)       # the step's own files and DeepSpeed's, to read apart
    Path(out, "sync_step.json").write_text(json.dumps(result) + "\n")
    print(f"sync step: {result}")


if __name__ == "__main__":
    import fire
    commands = {"ema_exact": ema_exact, "sync_step": sync_step}
    fire.Fire(commands[sys.argv.pop(1)] if len(sys.argv) > 1 and sys.argv[1] in commands else main)
