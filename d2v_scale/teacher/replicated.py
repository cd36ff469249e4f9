"""The replicated EMA teacher: a full copy on every rank (fairseq's layout).

Mirrors `fairseq/modules/ema_module.py`. EMA accumulators are fp32 whatever the compute dtype (a
bf16 EMA at decay 0.9999 does not move). The partitioned teacher lives in `sharded.py` behind the
same interface.
"""
from __future__ import annotations

import torch
from torch import nn

from .targets import make_targets, teacher_copy


class ReplicatedTeacher:
    """A full teacher on every rank: compute copy (model dtype) + fp32 accumulators."""

    sharded = False      # checkpoints hold one full fp32 state (rank 0 writes it)

    def __init__(self, student_encoder: nn.Module, model_cfg, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.cfg = model_cfg
        self.module = teacher_copy(student_encoder)
        if dtype is not None or device is not None:
            self.module.to(device=device, dtype=dtype)
        dtype = next(self.module.parameters()).dtype
        self.updates = 0  # EMA steps applied (checkpointed with the engine's client state)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.groups = _block_groups(self.names)
        if dtype == torch.float32:
            self.fp32 = [p.data for p in self.module.parameters()]  # the teacher is its own accumulator
        else:
            self.fp32 = [p.detach().float().clone() for p in self.module.parameters()]

    @property
    def encoder(self) -> nn.Module:
        return self.module

    # -- targets -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, source: torch.Tensor, feats: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """(B, T, D) fp32 targets. `feats` are the student's local features (used when the teacher
        has no local encoder of its own)."""
        m = self.module
        if m.ema_local_encoder:
            feats, padding_mask = m.local_features(source, padding_mask)
        _, layers = m(feats.to(next(m.parameters()).dtype), None, 1, padding_mask, return_layers=True)
        return make_targets(layers, self.cfg, padding_mask)

    # -- EMA -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, student_encoder: nn.Module, decay: float) -> None:
        """theta_T <- decay * theta_T + (1 - decay) * theta_S, fp32; skipped at decay 1 (frozen)."""
        if decay >= 1.0:
            return
        self.updates += 1
        student = dict(student_encoder.named_parameters())
        for idx in self.groups:  # one block at a time: a ZeRO-3 student is gathered block by block
            params = [student[self.names[i]] for i in idx]
            ema = [self.fp32[i] for i in idx]
            with _gathered(params):
                src = [p.detach().to(device=a.device, dtype=torch.float32) for p, a in zip(params, ema)]
                torch._foreach_mul_(ema, decay)
                torch._foreach_add_(ema, src, alpha=1.0 - decay)
        if self.fp32[0] is not next(self.module.parameters()).data:
            for p, a in zip(self.module.parameters(), self.fp32):
                p.data.copy_(a)

    def wait(self) -> None:
        """The update runs in the call (the sharded teacher may blend in the background)."""

    # -- state (checkpoint.py writes and reads the files) -----------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 teacher (names as the student encoder's)."""
        return {n: a.detach().cpu().clone() for n, a in zip(self.names, self.fp32)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        unexpected = set(state) - set(self.names)
        if missing or unexpected:
            raise KeyError(f"teacher state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for n, a in zip(self.names, self.fp32):
                a.copy_(state[n])
            for p, a in zip(self.module.parameters(), self.fp32):
                p.data.copy_(a)


def _block_groups(names: list[str]) -> list[list[int]]:
    """Indices of `names` grouped per block (`blocks.3.*`) or per other top-level module."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        parts = n.split(".")
        key = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class _gathered:
    """Read-only all-gather of ZeRO-3 partitioned student params (no-op for replicated params).

    `modifier_rank=None` is right here because nothing is written to the student; writes under it
    would be silently dropped (DeepSpeed partition_parameters.py)."""

    def __init__(self, params):
        self.params = [p for p in params if hasattr(p, "ds_id")]
        self.ctx = None

    def __enter__(self):
        if self.params:
            import deepspeed
            self.ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
