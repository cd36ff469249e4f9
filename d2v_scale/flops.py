"""Model FLOPs of one data2vec 2.0 training step, per sample (for MFU, `d2v bench` and `d2v plan`),
and `count_flops`, the same quantity counted by torch's FlopCounterMode on a real step.

2 FLOPs per multiply-add; what gets gradients costs 3x its forward (forward, input grad, weight
grad), except the first layer of the local encoder, which needs no input grad (2x); the teacher only
its forward. Per transformer block and token (width D, n tokens in the sequence): 24 D^2 + 4 n D
forward (QKV 6, output 2, MLP 16 D^2; QK^T and AV 2 n D each), the Megatron-LM count.
  student: the local encoder once per sample, then M clones x (extra + T_keep tokens through all
           blocks + the conv decoder on all T positions)
  teacher: once per sample on extra + T tokens, forward only (+ its own patch conv for images)
Recomputation under activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations


import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

from .masking import check_counts
from .models.audio import conv_layers_out

aten = torch.ops.aten


def block_flops(n: int, D: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block over a sequence of n tokens."""
    return n * (8 + 4 * mlp_ratio) * D * D + 4 * n * n * D


def decoder_flops(T: int, D: int, d, two_d: bool) -> float:
    flops, cin = 0.0, D
    taps = d.decoder_kernel ** (2 if two_d else 1)
    for _ in range(d.decoder_layers):
        flops += 2 * T * taps * (cin // d.decoder_groups) * d.decoder_dim
        cin = d.decoder_dim
    cur = d.decoder_dim
    for i in range(d.projection_layers - 1):
        nxt = int(cur * d.projection_ratio) if i == 0 else cur
        flops += 2 * T * cur * nxt
        cur = nxt
    return flops + 2 * T * cur * D


def local_flops(cfg, T: int, source_len: int) -> tuple[float, float]:
    """Forward FLOPs of the local encoder for one sample (patch conv / CNN + projection / 0 for text),
    as (first layer, the rest): the first layer's input needs no gradient."""
    m = cfg.model
    if m.modality == "image":
        return 2 * T * m.image.in_chans * m.image.patch_size ** 2 * m.embed_dim, 0.0
    if m.modality == "audio":
        layers = [2 * k * cin * cout * n for cin, cout, k, n in conv_layers_out(m.audio.feature_encoder_spec, source_len)]
        proj = 2 * T * conv_layers_out(m.audio.feature_encoder_spec, source_len)[-1][1] * m.embed_dim
        return layers[0], sum(layers[1:]) + proj
    return 0.0, 0.0


def step_flops_per_sample(cfg, tokens: int, extra: int = 0, source_len: int = 0) -> dict:
    """cfg: root Config; tokens: T on the mask grid; extra: CLS tokens; source_len: audio samples."""
    m, M = cfg.model, cfg.mask.clone_batch
    D, L = m.embed_dim, m.prenet_depth + m.depth
    first, rest = local_flops(cfg, tokens, source_len)
    if m.algorithm == "data2vec":   # data2vec 1 (d2v1/model.py): every token, one view, a regression head
        M = 1
        d = m.d2v1
        frac = d.num_mask_patches / tokens if d.masking == "block" else cfg.mask.mask_prob   # masked tokens
        head = 2 * tokens * frac * D * D * (1 if d.head_layers == 1 else 4)
        per_clone = L * block_flops(extra + tokens, D, m.mlp_ratio) + head
    else:
        keep = check_counts(tokens, cfg.mask.mask_prob, cfg.mask.inverse_mask or cfg.mask.mask_length <= 1)
        per_clone = L * block_flops(extra + keep, D, m.mlp_ratio) + decoder_flops(tokens, D, m.decoder,
                                                                                  m.modality == "image")
    teacher = L * block_flops(extra + tokens, D, m.mlp_ratio)
    if m.modality == "audio":  # conv positions: on the full zeroed sequence per clone, and in the teacher
        a = m.audio
        k = max(3, a.conv_pos_width // a.conv_pos_depth)
        pos = a.conv_pos_depth * 2 * tokens * k * (D // a.conv_pos_groups) * D
        per_clone += pos
        teacher += pos
    if m.modality == "image":
        teacher += first + rest
    student = 2 * first + 3 * (rest + M * per_clone)
    return {"student": student, "teacher": teacher, "total": student + teacher}


# -- counted on a real step ------------------------------------------------------------------------

def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, _groups, output_mask, out_shape) -> int:
    """Input grad and weight grad each cost the forward's FLOPs (also for grouped convolutions:
    torch 2.9's formula counts the weight grad of a grouped conv `groups` times over)."""
    fwd = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


# FlopCounterMode with the CPU flash-attention kernels it does not know and the grouped-conv fix
FLOP_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
                 aten.convolution_backward: _conv_backward}


def count_flops(fn) -> tuple[float, dict]:
    """(total FLOPs, FLOPs per op) of running `fn()` once (matmuls, convolutions, attention), counted
    by torch.utils.flop_counter.FlopCounterMode with FLOP_FORMULAS."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return float(counter.get_total_flops()), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
