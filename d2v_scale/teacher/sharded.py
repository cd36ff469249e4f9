"""ShardedTeacher: the EMA teacher partitioned like a ZeRO-3 student, its weights on CPU.

The teacher network (the EMA-tracked part of the encoder + target construction) is wrapped by its
own DeepSpeed engine: ZeRO-3, no optimizer, `offload_param: cpu` (pinned). Every parameter is split
into `world` equal flat chunks exactly as the student's are (same world, same per-parameter
partitioning), and its forward gathers each module's parameters to the device just in time,
prefetching the next and releasing them after, so the teacher costs a few blocks of device memory.

The EMA is shard-local: rank r blends its own fp32 slice of every student parameter into its own
fp32 teacher slice on CPU and refreshes the teacher's compute-precision slice (`ds_tensor`), once per
applied optimizer step. No collective runs. The student slice comes from
  * ZeRO-3: the optimizer's fp32 master partition (a view of its flat group);
  * ZeRO-0/1/2: the matching slice of the (replicated) student parameter, in its stored precision.
ema.py does it over a few contiguous runs (the teacher's slices are laid out in the masters' order):
with the masters on a GPU the accumulators stream through the device on a side stream; with the
masters on the host (an offloaded optimizer on a GPU box) a host thread blends them with the host's
cores. Either runs beside the next step's student forward (Data2Vec runs the student before asking
for targets), and the next use of the teacher waits for it; on a CPU-only run the blend is in the call.
Checkpoints hold each rank's fp32 slices (`teacher_rank{r}.pt`, written and read by checkpoint.py);
slices of a flat chunking re-partition to any world size, so the teacher itself never blocks a resume
at another size.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ..models import Block
from .ema import DeviceBlend, blend_host, coalesce, local_source, plan_layout, where
from .targets import make_targets, teacher_copy


class TeacherNet(nn.Module):
    """The teacher's whole forward as one module (what a DeepSpeed engine wraps)."""

    def __init__(self, encoder: nn.Module, model_cfg):
        super().__init__()
        self.encoder = encoder
        self.cfg = model_cfg

    def forward(self, source: torch.Tensor, feats: torch.Tensor, padding_mask=None) -> torch.Tensor:
        enc = self.encoder
        if enc.ema_local_encoder:
            feats, padding_mask = enc.local_features(source, padding_mask)
        _, layers = enc(feats, None, 1, padding_mask, return_layers=True)
        return make_targets(layers, self.cfg, padding_mask)                  # (B, T, D) fp32


def local_slice(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s chunk of a flattened tensor split into `world` equal, zero-padded chunks
    (DeepSpeed ZeRO-3's per-parameter partitioning)."""
    n = math.ceil(flat.numel() / world)
    out = torch.zeros(n, dtype=flat.dtype, device=flat.device)
    part = flat[rank * n: (rank + 1) * n]
    out[: part.numel()] = part
    return out


def teacher_ds_config(student_ds: dict) -> dict:
    """ZeRO-3 with parameters offloaded to pinned CPU memory, nothing persistent, small prefetch."""
    ds = {k: student_ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                     "train_batch_size") if k in student_ds}
    ds["bf16"] = {"enabled": bool(student_ds.get("bf16", {}).get("enabled"))}
    zs = student_ds.get("zero_optimization", {})
    ds["zero_optimization"] = {
        "stage": 3,
        "offload_param": {"device": "cpu", "pin_memory": True},
        "stage3_param_persistence_threshold": 0,         # every parameter partitioned (EMA writes ds_tensor)
        "stage3_prefetch_bucket_size": zs.get("stage3_teacher_prefetch_bucket_size", 2e7),
        "stage3_max_live_parameters": zs.get("stage3_teacher_max_live_parameters", 6e7),
        "stage3_max_reuse_distance": 0,
        "leaf_module": {"classes": [f"{Block.__module__}.{Block.__qualname__}"]},   # gathered per block
    }
    ds["steps_per_print"] = 10 ** 9
    return ds


class ShardedTeacher:
    sharded = True       # checkpoints hold one file of fp32 slices per rank

    def __init__(self, model: nn.Module, cfg, student_ds: dict, dist, asynchronous: bool | None = None):
        """`asynchronous`: the blend overlaps the next step's work (default: with a GPU)."""
        import deepspeed
        self.cfg, self.rank, self.world = cfg.model, dist.rank, dist.world
        net = TeacherNet(teacher_copy(model.encoder), cfg.model)
        self.names = [n for n, _ in net.encoder.named_parameters()]
        self.shapes = {n: tuple(p.shape) for n, p in net.encoder.named_parameters()}
        # fp32 accumulators: this rank's slice of every parameter, taken before any cast
        self.fp32 = [local_slice(p.detach().float().flatten(), self.rank, self.world).cpu()
                     for p in net.encoder.parameters()]
        self.engine, *_ = deepspeed.initialize(model=net, config=teacher_ds_config(student_ds))
        self.engine.eval()
        self.params = [p for _, p in self.engine.module.encoder.named_parameters()]
        for n, p, a in zip(self.names, self.params, self.fp32):
            if p.ds_tensor.numel() != a.numel():
                raise RuntimeError(f"teacher partition of {n} has {p.ds_tensor.numel()} elements, expected {a.numel()}")
        if not self.engine.bfloat16_enabled():       # fp32: the compute slices are the accumulators
            for p, a in zip(self.params, self.fp32):
                p.ds_tensor.data.copy_(a)
            self.fp32 = [p.ds_tensor.data for p in self.params]
        self.updates = 0
        self.cuda = dist.device.type == "cuda"
        self.device = dist.device
        self.asynchronous = self.cuda if asynchronous is None else asynchronous
        self._plan_key, self._pending = None, None
        self.runs: list = []                                # the blend's contiguous runs (ema.py)
        self._device_blend: DeviceBlend | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def encoder(self) -> nn.Module:
        return self.engine.module.encoder

    # -- targets -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, source: torch.Tensor, feats: torch.Tensor, padding_mask=None) -> torch.Tensor:
        self.wait()                                                         # the previous step's EMA
        dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        return self.engine(source, feats.to(dtype), padding_mask)

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
        sizes = [self.fp32[i].numel() for i in order]
        flat = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=self.cuda)
        low_flat = torch.empty(sum(sizes), dtype=self.params[0].ds_tensor.dtype, pin_memory=self.cuda) \
            if self.engine.bfloat16_enabled() else None
        fp32, lows, start = [None] * len(order), [None] * len(order), 0
        for i, size in zip(order, sizes):
            view = flat[start: start + size]
            view.copy_(self.fp32[i])
            fp32[i] = view
            p = self.params[i]
            if low_flat is None:                                             # fp32: the accumulator computes
                p.ds_tensor.data = view
            else:
                lows[i] = low_flat[start: start + size]
                lows[i].copy_(p.ds_tensor.data)
                p.ds_tensor.data = lows[i]
            start += size
        self.fp32 = fp32
        self.runs = coalesce(sources, self.fp32, lows)
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
        if self.cuda and runs and runs[0].src.is_cuda:                      # masters on the device
            if self._device_blend is None:
                low = self.params[0].ds_tensor.dtype if self.engine.bfloat16_enabled() else None
                self._device_blend = DeviceBlend(self.device, low)
            self._pending = self._device_blend(runs, decay)
            if not self.asynchronous:
                self.wait()
        elif self.asynchronous:                                             # masters on the host
            self._pending = self._host_pool().submit(blend_host, runs, decay)
        else:
            blend_host(runs, decay)

    def _host_pool(self) -> ThreadPoolExecutor:
        """One thread that blends with this rank's share of the host's cores (launchers often leave a
        rank one intra-op thread; on a GPU box the host is otherwise idle during the blend)."""
        if self._pool is None:
            if self.cuda:
                local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
                torch.set_num_threads(max(torch.get_num_threads(), len(os.sched_getaffinity(0)) // max(1, local)))
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-ema")
        return self._pool

    def wait(self) -> None:
        """Block until the last update is blended (a no-op when it ran in the call)."""
        pending, self._pending = self._pending, None
        if isinstance(pending, Future):
            pending.result()
        elif pending is not None:                                           # a CUDA event
            pending.synchronize()

    # -- state (checkpoint.py writes and reads the files) -----------------------------------------
    def state_dict(self) -> dict:
        """This rank's fp32 slices, with what re-splitting them needs."""
        self.wait()
        return {"world": self.world, "rank": self.rank, "shapes": self.shapes,
                "slices": {n: a.clone() for n, a in zip(self.names, self.fp32)}}

    def load_slices(self, slices: dict[str, torch.Tensor]) -> None:
        """This rank's own slices, as `state_dict()["slices"]` of the same world size held them."""
        self._set({n: slices[n] for n in self.names})

    def load_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """From full (unpartitioned) fp32 tensors: an imported teacher, or another world size's."""
        self._set({n: local_slice(full[n].float().flatten(), self.rank, self.world) for n in self.names})

    @torch.no_grad()
    def _set(self, slices: dict[str, torch.Tensor]) -> None:
        self.wait()
        for n, p, a in zip(self.names, self.params, self.fp32):
            a.copy_(slices[n])
            if p.ds_tensor.data.data_ptr() != a.data_ptr():
                p.ds_tensor.data.copy_(a)

    def full_state(self) -> dict[str, torch.Tensor]:
        """All-gathered fp32 teacher (a collective: every rank must call it)."""
        self.wait()
        out = {}
        for n, a in zip(self.names, self.fp32):
            if self.world > 1:
                parts = [torch.empty_like(a) for _ in range(self.world)]
                torch.distributed.all_gather(parts, a)
                flat = torch.cat(parts)
            else:
                flat = a
            out[n] = flat[: math.prod(self.shapes[n])].view(self.shapes[n]).clone()
        return out
