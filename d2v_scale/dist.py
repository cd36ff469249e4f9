"""Process-group set-up for every way d2v_scale is started, and rank-0 printing.

`deepspeed` launcher and torchrun export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under `srun` without a
launcher the SLURM_* variables are mapped onto them; a bare `d2v train` is a world of one.
Without a CUDA device DeepSpeed's CPU accelerator (gloo) is selected before DeepSpeed is imported.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import rendezvous


def select_accelerator() -> None:
    """DeepSpeed picks its accelerator when first imported: the CPU one (gloo) without a CUDA device.
    Its ops are JIT-built with the `ninja` beside this Python (see _one_ninja)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _extensions_dir()
    _one_ninja()


def _one_ninja() -> None:
    """torch builds DeepSpeed's ops with the first `ninja` on PATH. Two different ones (the venv's and
    the system's, depending on how a command was started) disagree on the build log's format and
    each rebuild every op from scratch (30-40 s for the CPU all-reduce). Put the venv's first."""
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def setup_env() -> None:
    """Environment for DeepSpeed and the process group; call before `import deepspeed`."""
    select_accelerator()
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _slurm_head_node()
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))


def _extensions_dir() -> None:
    """JIT-built DeepSpeed ops go to a folder of this Python environment (built once per environment,
    not once per user cache); `build_op` builds them there."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_op(builder_name: str) -> None:
    """Build (or find built) DeepSpeed's JIT op `builder_name` before DeepSpeed asks for it, so the
    rendezvous bound times the meeting alone. torch marks a build (and every load) with a `lock` file
    that a process killed meanwhile leaves behind, after which every later run would wait on it
    forever. d2v_scale builds under an flock of its own, which the kernel releases when its holder
    dies: a `lock` found while holding it was left by a dead process, and is removed."""
    import fcntl

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions"))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".d2v-build.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)                    # released at close, or when this process dies
        stale = root / builder.NAME / "lock"
        if stale.exists():
            stale.unlink(missing_ok=True)
            print(f"d2v: removed {stale}, left by a process killed while it built or loaded the op",
                  file=sys.stderr, flush=True)
        builder.load(verbose=False)


SHM_SEGMENT_BYTES = 69_206_024   # DeepSpeed 0.19's CPU all-reduce workspace, one per local rank


def _shm_allreduce_ranks() -> int:
    """How many ranks share DeepSpeed's CPU all-reduce through /dev/shm: it is used on the CPU
    accelerator when every rank is on this host (LOCAL_SIZE == WORLD_SIZE); 0 otherwise."""
    from deepspeed.accelerator import get_accelerator
    local = int(os.environ.get("LOCAL_SIZE", "0"))
    if get_accelerator().device_name() != "cpu" or local < 2 or local != int(os.environ.get("WORLD_SIZE", "1")):
        return 0
    return local if os.path.isdir("/dev/shm") else 0


def _check_shm_room(deepspeed, ranks: int) -> None:
    """Each of those ranks needs a workspace in /dev/shm; too little room (a container's 64 MB default)
    makes them crash or wait on each other forever. Fall back to gloo's all-reduce then, and say how
    to get the fast path back."""
    free, need = shutil.disk_usage("/dev/shm").free, ranks * SHM_SEGMENT_BYTES
    if free < 2 * need:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"warning: /dev/shm has {free / 2**20:.0f} MiB free and DeepSpeed's shared-memory all-reduce "
                  f"needs {need / 2**20:.0f} MiB for {ranks} ranks: using gloo's all-reduce instead (slower). "
                  "Give the container more shared memory (docker run --shm-size=1g) to get it back.",
                  file=sys.stderr, flush=True)


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """DeepSpeed maps one segment per rank in /dev/shm and never unlinks it, so every CPU run would
    leave RAM behind. Once every rank has mapped its peers' segments (they wait for each other inside
    init_distributed; the barrier makes it certain) the names can go: the mappings stay valid until
    the processes exit, and a killed run leaves nothing either."""
    torch.distributed.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")
    try:
        os.unlink(name)
    except FileNotFoundError:   # the shm op could not be built here
        pass


def _slurm_head_node() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "127.0.0.1"))
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodes.split(",")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU)."""
    setup_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)
    shm_ranks = _shm_allreduce_ranks()
    if shm_ranks:
        _check_shm_room(deepspeed, shm_ranks)
    build_op("ShareMemCommBuilder")        # DeepSpeed's CPU all-reduce (nothing to build on a GPU)
    rendezvous.meet(lambda: deepspeed.init_distributed(verbose=False), int(os.environ["RANK"]),
                    get_accelerator().communication_backend_name() == "nccl")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if shm_ranks and deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"):
        _unlink_shm_allreduce_buffer(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc = get_accelerator()
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(acc.device_name())
    return Dist(rank, world, local_rank, device)


def single() -> Dist:
    """A world of one without a process group (a command that was not launched on several ranks)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return Dist(0, 1, 0, device)


def print0(*args, **kw) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kw, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def device_scalar(v: int | float | torch.Tensor, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """() `dtype` on `device`: a host number filled there (no copy), a device count (the masked tokens
    of a padded batch) converted there; neither is read back."""
    if isinstance(v, torch.Tensor):
        return v.to(dtype).reshape(())
    return torch.full((), float(v), dtype=dtype, device=device)


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
                "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "gather", "scatter",
                "all_to_all", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv")


_DS_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "allgather_fn", "reduce_scatter_fn",
                   "reduce_scatter_tensor", "broadcast", "reduce", "barrier", "all_to_all_single", "inference_all_reduce")


class count_collectives:
    """Counts collective calls (and the bytes of their tensors) inside the block, at both entry
    points: torch.distributed and deepspeed.comm (ZeRO-3's gathers go through the latter, whose
    backend holds its own references to the torch functions)."""

    def __init__(self):
        self.calls, self.bytes, self._saved = 0, 0, {}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            for a in list(args) + list(kwargs.values()):
                for t in (a if isinstance(a, (list, tuple)) else [a]):
                    if isinstance(t, torch.Tensor):
                        self.bytes += t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return counted

    def __enter__(self):
        import deepspeed.comm as ds_comm
        for module, names in ((torch.distributed, _COLLECTIVES), (ds_comm, _DS_COLLECTIVES)):
            for name in names:
                fn = getattr(module, name, None)
                if fn is not None:
                    self._saved[module, name] = fn
                    setattr(module, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for (module, name), fn in self._saved.items():
            setattr(module, name, fn)
