"""Helpers the tests share: paths, the child-process environment, and runners for `d2v` and the
deepspeed launcher that put a wall-clock timeout on the whole process group."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from d2v_scale.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def child_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


def run_group(cmd: list[str], timeout: float, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Like subprocess.run(capture_output=True, text=True), but a timeout kills the whole process group
    (launcher, ranks, data-loader workers, object store), so nothing is left to slow later tests, and
    the failure shows where each process was waiting."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGABRT first: every Python process of the group (PYTHONFAULTHANDLER) prints the stack of each
        # of its threads, so a hang says where it waited; then SIGKILL for whatever is left
        for sig, wait in ((signal.SIGABRT, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass                                    # the whole group has already ended
            try:
                out, err = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-6000:]}\n{err[-12000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_d2v(args: list[str], nproc: int = 1, timeout: float = 240, cwd: Path = ROOT, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """`d2v ARGS` in one process, or under `deepspeed --num_accelerators N` when nproc > 1 (stderr in stdout)."""
    if nproc > 1:
        cmd = [str(BIN / "deepspeed"), "--num_accelerators", str(nproc), "--no_local_rank",
               "--master_port", str(free_port()), "--module", "d2v_scale.cli", *args]
    else:
        cmd = [sys.executable, "-m", "d2v_scale.cli", *args]
    res = run_group(cmd, timeout, cwd, env)
    result = subprocess.CompletedProcess(cmd, res.returncode, res.stdout + res.stderr, "")
    if check and res.returncode != 0:
        pytest.fail(f"exit {res.returncode}: {' '.join(cmd)}\n{result.stdout[-6000:]}")
    return result


def d2v_here(args: list) -> subprocess.CompletedProcess:
    """`d2v ARGS` in this process, returned as run_d2v(check=False) returns it (what it printed, then its
    exit line): for commands that refuse or only check, where a new interpreter would cost more than the
    command. An exception other than the exit fails the test; so does one that started a process group."""
    import contextlib
    import io

    import torch.distributed

    from d2v_scale import cli
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as e:
            if isinstance(e.code, str):
                out.write(e.code + "\n")
            code = e.code if isinstance(e.code, int) else 1
    assert not torch.distributed.is_initialized(), f"d2v {args[0]} started a process group in the test process"
    return subprocess.CompletedProcess(["d2v", *map(str, args)], code, out.getvalue(), "")


def shm_segments() -> set[str]:
    """DeepSpeed CPU all-reduce segments of this user in /dev/shm (RAM: 69 MB per rank)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")} if shm.is_dir() else set()


def rewound(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of `run_dir` as it stood at its checkpoint of `step` (later checkpoints left out, `latest`
    naming it, metrics and TensorBoard as they are): resuming it must retrace the uninterrupted run's
    steps, and its metrics must lose the rows past `step` on the way. One launch cheaper than a run
    stopped at `step` (the stop itself is tested with signals and --run.stop_after elsewhere)."""
    tag = f"step_{step:08d}"

    def later(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(folder).name == "checkpoints" and n.startswith("step_") and n != tag]
    shutil.copytree(run_dir, dest, ignore=later)
    (dest / "checkpoints" / "latest").write_text(tag)
    best = dest / "checkpoints" / "best"                 # fine-tuning: the best so far cannot be later
    if best.is_file() and not (dest / "checkpoints" / best.read_text().strip()).is_dir():
        best.write_text(tag)
    return dest


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["train/loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


TRAIN_ARGS = ["--preset", "vit_base_patch16_debug", "--data.num_workers=1", "--data.batch_size=4",
              "--run.log_every=1", "--optim.warmup_steps=2", "--run.peak_tflops=1"]
"""The short runs' flags. A given peak spares each start the GEMM peak measurement (MFU is not what these
runs check; the launcher runs, test_modalities.py and test_device_terms.py measure it)."""
ZERO2_ARGS = ["--ds_config", "ds_configs/zero2.json", "--run.save_every=2", *TRAIN_ARGS]
"""1 rank, ZeRO-2, a checkpoint every 2 steps: `zero2_run` in conftest.py is 4 steps of it."""


LAUNCH_STEPS = 40
LAUNCH_ARGS = ["--optim.max_steps=%d" % LAUNCH_STEPS, "--run.log_every=1", "--data.batch_size=4",
               "--data.num_workers=1", "--optim.warmup_steps=2", "--run.save_every=1000"]
"""The launcher tests' run (the debug ViT on the test image shards, 2 ranks, ZeRO-3): Slurm, hostfiles,
pdsh over ssh, a killed rank and streaming from S3 must each retrace its uninterrupted run
(`zero3_reference` in conftest.py) bit for bit."""


def d2v1_golden_batch(modality: str, g: dict, mask_idx: int):
    """(source, mask) of a tests/assets/d2v1 golden file: images and BEiT's mask, waveforms and the span
    mask, tokens and where the masked LM put `<mask>` (mask_idx)."""
    if modality == "image":
        return g["inputs"], g["bool_masked_pos"].flatten(1)
    if modality == "audio":
        return g["inputs"], g["mask"]
    return g["tokens"], g["src_tokens"].eq(mask_idx)
