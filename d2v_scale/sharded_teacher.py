"""ShardedTeacher: the EMA teacher partitioned like a ZeRO-3 student, its weights on CPU.

The teacher network (the EMA-tracked part of the encoder + target construction) is wrapped by its
own DeepSpeed engine: ZeRO-3, no optimizer, `offload_param: cpu` (pinned). Every parameter is split
into `world` equal flat chunks exactly as the student's are (same world, same per-parameter
partitioning), and its forward gathers each module's parameters to the device just in time,
prefetching the next and releasing them after, so the teacher costs a few blocks of device memory.

The EMA is shard-local: rank r blends its own fp32 slice of every student parameter into its own
fp32 teacher slice on CPU and refreshes the teacher's compute-precision slice (`ds_tensor`), once per
applied optimizer step. No collective runs. The student slice comes from
  * ZeRO-3: `deepspeed.utils.safe_get_local_fp32_param` (the optimizer's fp32 master partition);
  * ZeRO-0/1/2: the matching slice of the (replicated) student parameter, in its stored precision.
Checkpoints hold each rank's fp32 slices (`teacher_rank{r}.pt`, written and read by checkpoint.py);
slices of a flat chunking re-partition to any world size, so the teacher itself never blocks a resume
at another size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .teacher import make_targets, teacher_copy


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
    }
    ds["steps_per_print"] = 10 ** 9
    return ds


class ShardedTeacher:
    sharded = True       # checkpoints hold one file of fp32 slices per rank

    def __init__(self, model: nn.Module, cfg, student_ds: dict, dist):
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

    @property
    def encoder(self) -> nn.Module:
        return self.engine.module.encoder

    # -- targets -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, source: torch.Tensor, feats: torch.Tensor, padding_mask=None) -> torch.Tensor:
        dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        return self.engine(source, feats.to(dtype), padding_mask)

    # -- EMA -----------------------------------------------------------------------------------
    def _student_slices(self, student_encoder: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(student slices, the matching teacher fp32 slices); views where possible, no padding copied."""
        student = dict(student_encoder.named_parameters())
        src, dst = [], []
        for n, a in zip(self.names, self.fp32):
            p = student[n]
            if hasattr(p, "ds_id"):                                         # ZeRO-3: the fp32 master shard
                from deepspeed.utils import safe_get_local_fp32_param
                s = safe_get_local_fp32_param(p).detach()
            else:                                                           # replicated: this rank's chunk
                flat = p.detach().view(-1)
                start = min(self.rank * a.numel(), flat.numel())
                s = flat[start: start + a.numel()]
            if s.numel() == 0:
                continue
            src.append(s if s.device == a.device and s.dtype == a.dtype else s.to(a.device, torch.float32))
            dst.append(a[: s.numel()])
        return src, dst

    @torch.no_grad()
    def update(self, student_encoder: nn.Module, decay: float) -> None:
        """theta_T <- decay * theta_T + (1 - decay) * theta_S on this rank's slices only (no collectives)."""
        if decay >= 1.0:
            return
        self.updates += 1
        src, dst = self._student_slices(student_encoder)
        torch._foreach_mul_(dst, decay)
        torch._foreach_add_(dst, src, alpha=1.0 - decay)
        for p, a in zip(self.params, self.fp32):
            if p.ds_tensor.data.data_ptr() != a.data_ptr():
                p.ds_tensor.data.copy_(a)                                   # compute-precision slice

    # -- state (checkpoint.py writes and reads the files) -----------------------------------------
    def state_dict(self) -> dict:
        """This rank's fp32 slices, with what re-splitting them needs."""
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
        for n, p, a in zip(self.names, self.params, self.fp32):
            a.copy_(slices[n])
            if p.ds_tensor.data.data_ptr() != a.data_ptr():
                p.ds_tensor.data.copy_(a)

    def full_state(self) -> dict[str, torch.Tensor]:
        """All-gathered fp32 teacher (a collective: every rank must call it)."""
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
