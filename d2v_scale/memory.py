"""Per-rank bytes of a run's states and activations: what `d2v plan` prints and what the teacher's
`auto` placement fits into the device (engine.py).

Model states are counted per parameter (so ZeRO-3's per-parameter padding to a multiple of the world
size is exact), for AdamW:
  bf16 training: params 2 B, grads 2 B, fp32 grads 4 B, fp32 master 4 B, Adam moments 8 B
  fp32 training: params 4 B, grads 4 B, fp32 master 4 B (ZeRO-1/2/3 keep a copy of the partition;
                 without ZeRO the optimizer steps the params), Adam moments 8 B
ZeRO-1 partitions the fp32 grads/master/moments, ZeRO-2 also the 16-bit grads, ZeRO-3 also the
params; offload_optimizer moves the partitioned fp32 states to host memory. The teacher's bytes
per placement come from teacher/placement.py. Activations (bf16, Megatron-LM's per-layer count with
flash/SDPA attention: 34 * D bytes per token; without flash add 5 * heads * n): student blocks on
M x (T_keep + extra) tokens per sample, the conv decoder on M x T positions, targets and loss in fp32;
with activation checkpointing each block keeps only its input (2 * D bytes per token) plus one
block's activations during recomputation. data2vec 1 (`d2v1_activation_bytes`): every token of one
view, a regression head instead of the decoder, and the teacher's block results held until its targets
are made.
"""
from __future__ import annotations

import math

from .masking import check_counts
from .models import ENCODERS, token_grid
from .teacher.placement import teacher_memory, teacher_traffic


def model_states(student_numels: list[int], teacher_numels: list[int], world: int, zero: int, bf16: bool,
                 offload_optimizer: bool, teacher: str, block_numel: int = 0) -> dict:
    """Per-rank bytes of each model state (device and host); `teacher`: its placement."""
    part = sum(math.ceil(n / world) for n in student_numels)       # this rank's padded partition
    full = sum(student_numels)
    lp = 2 if bf16 else 4
    shard = lambda stage: part if zero >= stage else full                # noqa: E731
    dev = {"student params": lp * shard(3)}
    states = {}
    if bf16:
        dev["16-bit grads"] = 2 * shard(2)
    states["fp32 grads"] = 4 * shard(1)          # as reduced at the step (ZeRO-1 holds them full during backward)
    if bf16 or zero >= 1:        # fp32 without ZeRO: the optimizer steps the params themselves
        states["fp32 master"] = 4 * shard(1)
    states["Adam moments"] = 8 * shard(1)
    host = {}
    for k, v in states.items():
        (host if offload_optimizer and k != "16-bit grads" else dev)[k] = v
    t = teacher_memory(teacher_numels, block_numel, world, bf16, "host" if teacher == "sharded" else teacher)
    return {"device": {**dev, **t["device"]}, "host": {**host, **t["host"]}}


def activation_bytes(cfg, micro: int, checkpointing: bool, flash: bool = True) -> dict:
    m, M = cfg.model, cfg.mask.clone_batch
    D, L, H = m.embed_dim, m.prenet_depth + m.depth, m.num_heads
    T, E = math.prod(token_grid(cfg)), ENCODERS[m.modality].num_extra_tokens
    if m.algorithm == "data2vec":
        return d2v1_activation_bytes(cfg, micro, checkpointing, flash)
    keep = check_counts(T, cfg.mask.mask_prob, cfg.mask.inverse_mask or cfg.mask.mask_length <= 1)
    n = keep + E
    tokens = micro * M * n
    per_token_layer = 34 * D + (0 if flash else 5 * H * n)
    if checkpointing:
        student = L * 2 * D * tokens + per_token_layer * tokens
    else:
        student = L * per_token_layer * tokens
    dd = m.decoder.decoder_dim
    decoder = micro * M * T * (2 * D + m.decoder.decoder_layers * 6 * dd + 2 * dd + 2 * D)
    masked = micro * M * (T - keep)
    loss = micro * T * D * 4 + 3 * masked * D * 4
    teacher = micro * (T + E) * D * (16 + 4)          # one live block + the running fp32 target sum
    return {"student blocks": student, "decoder": decoder, "targets + loss (fp32)": loss,
            "teacher forward (transient)": teacher}


def d2v1_activation_bytes(cfg, micro: int, checkpointing: bool, flash: bool = True) -> dict:
    """data2vec 1 (d2v1/model.py): the student's blocks on every token of one view, a regression head on
    the masked ones (at most all), no decoder; the teacher's block results of every block held until
    the targets are made (bf16, one per block: d2v1/model.py keeps each block's output or FFN result)
    beside the running block, then the top-K normalised in fp32."""
    m = cfg.model
    D, L, H = m.embed_dim, m.depth, m.num_heads
    T, E = math.prod(token_grid(cfg)), ENCODERS[m.modality].num_extra_tokens
    tokens = micro * (T + E)
    per_token_layer = 34 * D + (0 if flash else 5 * H * (T + E))
    student = (L * 2 * D + per_token_layer if checkpointing else L * per_token_layer) * tokens
    head = micro * T * D * (2 + 4) * (1 if m.d2v1.head_layers == 1 else 3)     # input + fp32 prediction
    loss = micro * T * D * 4 * 4                  # targets, the fp32 layer being normalised, y_m, the error
    teacher = tokens * D * (16 + 2 * L)           # the running block + every block's result (bf16)
    return {"student blocks": student, "regression head": head, "targets + loss (fp32)": loss,
            "teacher forward (transient)": teacher}


def window_bytes(cfg, micro: int, window: int, lp: int = 2) -> int:
    """The window pass (one teacher pass for `window` micro-batches): per micro-batch its block input
    (B, E+T, D) in the compute dtype, its running fp32 target sum and its finished fp32 targets
    (B, T, D), held until its micro-step: linear in the window."""
    m = cfg.model
    T, E = math.prod(token_grid(cfg)), ENCODERS[m.modality].num_extra_tokens
    return window * micro * ((T + E) * m.embed_dim * lp + 2 * T * m.embed_dim * 4)


def window_size(cfg, micro: int, gas: int, lp: int = 2) -> int:
    """Micro-batches per teacher pass: the whole accumulation window when its targets and block inputs
    fit `teacher.window_gb`, else as many as fit (at least 1); 1 when the window pass is off or the
    teacher reads the student's local features (audio, text: they exist only inside its forward), or is
    data2vec 1's (d2v1/model.py runs its teacher's blocks itself, per micro-step)."""
    if (cfg.teacher.window_gb <= 0 or cfg.model.algorithm == "data2vec"
            or not ENCODERS[cfg.model.modality].ema_local_encoder):
        return 1
    return max(1, min(gas, int(cfg.teacher.window_gb * 1e9 // window_bytes(cfg, micro, 1, lp))))


def student_device_bytes(cfg, s_numels: list[int], world: int, zero: int, bf16: bool, offload_optimizer: bool,
                         micro: int, checkpointing: bool) -> int:
    """The student's device bytes (states, ZeRO-3's gathered working set, activations)."""
    states = model_states(s_numels, [], world, zero, bf16, offload_optimizer, "replicated")
    dev = sum(states["device"].values()) + sum(activation_bytes(cfg, micro, checkpointing).values())
    return dev + ((2 if bf16 else 4) * 2 * max(s_numels) if zero >= 3 else 0)


def placements(cfg, s_numels: list[int], t_numels: list[int], block_numel: int, world: int, zero: int, bf16: bool,
               offload_optimizer: bool, micro: int, gas: int, checkpointing: bool) -> dict[str, dict]:
    """Every teacher placement: its traffic per optimizer step, the teacher's device and host bytes and
    the device bytes of the whole run (student + teacher + the window pass)."""
    lp = 2 if bf16 else 4
    window = window_size(cfg, micro, gas, lp)
    passes = math.ceil(gas / window)
    student = student_device_bytes(cfg, s_numels, world, zero, bf16, offload_optimizer, micro, checkpointing)
    out = {}
    for p in ("replicated", "device", "device_bf16_host_ema", "host"):
        mem = teacher_memory(t_numels, block_numel, world, bf16, p)
        out[p] = {"traffic": teacher_traffic(t_numels, world, passes, bf16, p, zero, offload_optimizer),
                  "teacher_device": sum(mem["device"].values()), "teacher_host": sum(mem["host"].values()),
                  "device_total": student + sum(mem["device"].values()) + window_bytes(cfg, micro, window, lp),
                  "passes": passes}
    return out
