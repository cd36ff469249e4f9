"""The replicated EMA teacher: a full copy on every rank (fairseq's layout).

Mirrors `fairseq/modules/ema_module.py`. EMA accumulators are fp32 whatever the compute dtype (a
bf16 EMA at decay 0.9999 does not move). The partitioned teacher lives in `sharded.py` behind the
same interface (`__call__`/`window`: data2vec 2.0 targets; `block_results`: each block's results, for
data2vec 1's model).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .ema import coalesce, master_slice, plan_layout, where
from .targets import teacher_copy, window_targets


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
        # the rounding rule: the accumulators start from the compute copy (under bf16 the rounded init,
        # which is also what DeepSpeed builds the student's fp32 masters from)
        if dtype == torch.float32:
            self.fp32 = [p.data for p in self.module.parameters()]  # the teacher is its own accumulator
        else:
            self.fp32 = [p.detach().float().clone() for p in self.module.parameters()]
        self._plan_key, self.runs = None, []

    @property
    def encoder(self) -> nn.Module:
        return self.module

    def reading(self):
        """The encoder, for a reader between steps (nothing is pending here)."""
        return contextlib.nullcontext(self.module)

    # -- targets -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, source: torch.Tensor, feats: torch.Tensor, padding_mask=None) -> torch.Tensor:
        """(B, T, D) fp32 targets. `feats` are the student's local features (used when the teacher
        has no local encoder of its own)."""
        return self.window([(source, feats, padding_mask)])[0]

    def window(self, items: list[tuple]) -> list[torch.Tensor]:
        """Targets of several micro-batches in one pass (targets.window_targets)."""
        return window_targets(self.module, items, self.cfg, next(self.module.parameters()).dtype)

    @torch.no_grad()
    def block_results(self, embed):
        """Each block's (x, ffn) (B, E+T, D) in order, on the input `embed(encoder) -> (x, bias,
        padding_mask)` builds (data2vec 1: d2v1/model.py runs the teacher's blocks through this)."""
        x, bias, pad = embed(self.module)
        for blk in self.module.blocks:
            x, ffn = blk(x, bias, pad)                                            # (B, E+T, D) x2
            yield x, ffn

    # -- EMA -----------------------------------------------------------------------------------
    def _plan(self, sources: list[torch.Tensor]) -> list:
        """The accumulators (and the compute copy) laid out in the sources' order, once: a few
        contiguous runs when the sources are DeepSpeed's flat groups (ZeRO-1/2)."""
        key = where(sources)
        if key == self._plan_key:
            return self.runs
        params = list(self.module.parameters())
        order = plan_layout(sources)
        flat = torch.empty(sum(a.numel() for a in self.fp32), dtype=torch.float32, device=self.fp32[0].device)
        own = self.fp32[0].data_ptr() == params[0].data_ptr()
        low_flat = None if own else torch.empty(flat.numel(), dtype=params[0].dtype, device=flat.device)
        fp32, lows, start = [None] * len(order), [None] * len(order), 0
        for i in order:
            n = self.fp32[i].numel()
            fp32[i] = flat[start: start + n].view_as(self.fp32[i]).copy_(self.fp32[i])
            if own:
                params[i].data = fp32[i]
            else:
                lows[i] = low_flat[start: start + n].view_as(params[i]).copy_(params[i].data)
                params[i].data = lows[i]
            start += n
        self.fp32 = fp32
        self.runs = coalesce([s.reshape(-1) for s in sources], [a.view(-1) for a in fp32],
                             [None if t is None else t.view(-1) for t in lows])
        self._plan_key = key
        return self.runs

    @torch.no_grad()
    def update(self, student_encoder: nn.Module, decay: float) -> None:
        """theta_T <- decay * theta_T + (1 - decay) * theta_S, fp32; skipped at decay 1 (frozen).
        theta_S: the student's fp32 master under ZeRO-3 (all-gathered block by block, one collective
        each), its compute weights otherwise (whole on every rank: the rounded master)."""
        if decay >= 1.0:
            return
        self.updates += 1
        student = dict(student_encoder.named_parameters())
        params = [student[n] for n in self.names]
        if not any(hasattr(p, "ds_id") for p in params):
            for run in self._plan([p.detach() for p in params]):                # a few flat runs
                run.dst.mul_(decay)
                run.dst.add_(run.src, alpha=1.0 - decay)
                if run.low is not None:
                    run.low.copy_(run.dst)
            return
        module = list(self.module.parameters())
        # ZeRO-3: read the optimizer's fp32 master slices, never the student's parameters. Gathering them
        # with deepspeed.zero.GatheredParameters re-partitions them on exit, persistent ones included, and
        # a resumed run then stops in its second step with DeepSpeed's "tracing error ... expected the
        # next 1 parameters in the parameter fetch queue" (tests/test_d2v1.py resumes under ZeRO-3)
        for idx in self.groups:  # one block at a time: the fp32 masters gathered, blended with foreach
            ema = [self.fp32[i] for i in idx]
            src = gather_masters([params[i] for i in idx], ema[0].device)
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, src, alpha=1.0 - decay)
            if ema[0].data_ptr() != module[idx[0]].data_ptr():
                torch._foreach_copy_([module[i].data for i in idx], ema)

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


def gather_masters(params: list, device) -> list[torch.Tensor]:
    """The full fp32 masters of ZeRO-3 parameters: every rank's master slices packed and all-gathered
    in one collective (read-only: nothing is written to the student)."""
    import torch.distributed as tdist
    slices = [master_slice(p) for p in params]                                  # (ceil(n / world),) each
    send = torch.cat(slices).to(device)                                          # (k,)
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    out = send.new_empty(world, send.numel())                                    # (world, k)
    if world > 1:
        tdist.all_gather(list(out.unbind(0)), send)
    else:
        out[0] = send
    full, start = [], 0
    for p, s in zip(params, slices):
        full.append(out[:, start: start + s.numel()].reshape(-1)[: p.ds_numel].view(p.ds_shape))
        start += s.numel()
    return full
