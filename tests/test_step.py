"""The training step's own work, made faster with the numbers unchanged: FLOPs counted two ways agree,
masks drawn ahead in the loader's workers equal the step's own, the gathered loss equals the indexed
one, and the channels-last decoder equals the transposing formulation."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2v_scale.config import with_vocab
from d2v_scale.d2v import Data2Vec
from d2v_scale.data import build_loader, synthetic_batch
from d2v_scale.d2v1.model import Data2Vec1
from d2v_scale.flops import count_flops, step_flops_per_sample
from d2v_scale.masking import AheadMasks, MaskInfo, block_mask, step_masks
from d2v_scale.models import token_grid
from d2v_scale.models.decoder import Conv1dChannelsLast, ConvBlock
from d2v_scale.presets import FINETUNE_PRESETS, PRESETS, get_preset
from d2v_scale.teacher import ReplicatedTeacher

DEBUG = [p for p in PRESETS if p.endswith("_debug") and p not in FINETUNE_PRESETS.values()]   # pretraining twins


@pytest.mark.parametrize("name", DEBUG)
def test_flops_py_agrees_with_flop_counter_mode(name):
    """flops.py's model FLOPs of a step (student forward + backward, teacher forward) within 3% of
    torch's FlopCounterMode counting the same step of the real model."""
    cfg = with_vocab(get_preset(name))
    cfg.data.batch_size = 2
    torch.manual_seed(0)
    v1 = cfg.model.algorithm == "data2vec"
    model = Data2Vec1(cfg.model) if v1 else Data2Vec(cfg.model, cfg.mask.mask_noise_std)
    teacher = ReplicatedTeacher(model.encoder, cfg.model)
    x = synthetic_batch(cfg)["source"]
    grid = model.encoder.token_shape(x)
    info = step_masks(cfg, 2 * cfg.mask.clone_batch, grid, 0, 0, 0, x)
    counted, by_op = count_flops(lambda: model(x, info, teacher)["loss"].backward())
    est = step_flops_per_sample(cfg, math.prod(grid), model.encoder.num_extra_tokens,
                                x.shape[-1])["total"] * 2
    assert abs(est / counted - 1) < 0.03, (est, counted, by_op)
    assert any("attention" in op for op in by_op)              # the CPU attention kernels are counted


def test_grouped_conv_backward_is_counted_once():
    """torch 2.9 counts a grouped conv's weight grad `groups` times over; the corrected formula gives
    input grad + weight grad = 2x the forward."""
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=16)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    forward = 2 * 2 * 64 * 8 * 8 * (64 // 16) * 9                 # 2 FLOPs x B x C_out x H x W x C_in/g x k^2
    total, _ = count_flops(lambda: conv(x).sum().backward())
    assert total == 3 * forward


def test_masks_drawn_ahead_in_the_workers_are_the_steps_own(image_shards):
    """Batch k of the stream carries the masks of micro-step divmod(k, accumulation), drawn from the
    same seed the step would draw them from; a batch resumed mid-epoch gets the right ones too."""
    cfg = get_preset("vit_base_patch16_debug")
    cfg.data.path, cfg.data.batch_size, cfg.data.num_workers, cfg.data.epoch_samples = str(image_shards), 4, 2, 24
    grid = token_grid(cfg)
    rows = 4 * cfg.mask.clone_batch
    loader = iter(build_loader(cfg, 0, 1, prepare=AheadMasks(cfg, 0, accumulation=2)))
    for k in range(8):                                         # 6 batches per epoch: crosses an epoch
        batch = next(loader)
        step, micro = divmod(k, 2)
        info = MaskInfo.from_batch(batch, step, micro)
        own = step_masks(cfg, rows, grid, step, micro, 0)
        assert info is not None and torch.equal(info.mask, own.mask) and torch.equal(info.ids_keep, own.ids_keep)
        assert MaskInfo.from_batch(batch, step + 1, micro) is None   # drawn for another step: not used
    state = {"epoch": 0, "batches": 3, "samples_seen": 12, "skipped": 0, "read_errors": 0}
    batch = next(iter(build_loader(cfg, 0, 1, state, prepare=AheadMasks(cfg, 0, accumulation=2))))
    assert batch["mask_step"].tolist() == [1, 1]


def test_gathered_loss_is_bitwise_the_indexed_one():
    """The loss gathers the masked positions at known sizes (no nonzero, no host sync); same tensors,
    same order, as indexing with mask.nonzero()."""
    B, M, D = 3, 4, 8
    mask = block_mask(B * M, (8, 8), 0.8, 3, 0.07, True, torch.Generator().manual_seed(0))
    info = MaskInfo.from_mask(mask)
    pred, y = torch.randn(B * M, 64, D), torch.randn(B, 64, D)
    rows, pos = mask.nonzero(as_tuple=True)
    idx = info.masked_positions()
    assert torch.equal(torch.gather(pred, 1, idx[..., None].expand(-1, -1, D)).flatten(0, 1), pred[rows, pos])
    assert torch.equal(torch.gather(y, 1, idx.reshape(B, -1)[..., None].expand(-1, -1, D)).flatten(0, 1),
                       y[rows // M, pos])
    assert torch.equal(MaskInfo(mask, info.ids_keep, info.ids_restore).masked_positions(), idx)


def test_weighted_losses_are_the_indexed_ones():
    """Where the count of scored tokens varies by row (padded data2vec 2.0 batches; data2vec 1's masks)
    the loss gathers a fixed count and weighs the rest 0: the scored rows are those indexing selects,
    in its order, and the loss, the count and the variance statistics equal the indexed ones."""
    from d2v_scale.d2v import var_stats
    from d2v_scale.d2v1.masks import loss_positions
    from d2v_scale.d2v1.targets import regression_loss
    cfg = with_vocab(get_preset("d2v1_text_base_debug")).model
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 20, 8, generator=gen), torch.randn(3, 20, 8, generator=gen)
    code = torch.randint(0, 4, (3, 20), generator=gen)                # text code: 1 = <mask> scores
    code[2] = 0                                                        # a row with nothing scored
    for mask in (code == 1, code):
        scored = code == 1
        ids = loss_positions(mask)                                     # (B, K), K = the most of any row
        assert ids.shape == (3, int(scored.sum(1).max()))
        keep = torch.gather(scored, 1, ids).flatten()                  # (B*K,)
        pred = torch.gather(x, 1, ids[..., None].expand(-1, -1, 8)).flatten(0, 1)
        tgt = torch.gather(y, 1, ids[..., None].expand(-1, -1, 8)).flatten(0, 1)
        assert torch.equal(pred[keep], x[scored]) and torch.equal(tgt[keep], y[scored])
        assert int(keep.sum()) == int(scored.sum())
        assert torch.allclose(regression_loss(pred, tgt, cfg, keep), regression_loss(x[scored], y[scored], cfg),
                              rtol=1e-6, atol=0)
        assert torch.allclose(var_stats(pred, keep), var_stats(x[scored]), rtol=1e-12, atol=1e-12)


def _transposing_block(conv, dim, x):
    """The fairseq formulation: conv on (B, C, *spatial), LayerNorm over channels moved last and back."""
    h = x.movedim(-1, 1).contiguous()
    y = conv(h) if not isinstance(conv, Conv1dChannelsLast) else nn.Conv1d.forward(conv, h)
    if conv.kernel_size[0] % 2 == 0:
        y = y[(..., *[slice(0, n) for n in h.shape[2:]])]
    y = F.layer_norm(y.movedim(1, -1), (dim,), eps=1e-5)
    return F.gelu(y)


@pytest.mark.parametrize("kind,k,groups", [("2d", 3, 16), ("1d", 9, 1), ("1d", 19, 16), ("1d", 4, 2)])
def test_channels_last_decoder_block_equals_the_transposing_one(kind, k, groups):
    torch.manual_seed(0)
    D = 32
    conv = nn.Conv2d(D, D, k, padding=k // 2, groups=groups) if kind == "2d" else \
        Conv1dChannelsLast(D, D, k, padding=k // 2, groups=groups)
    block = ConvBlock(conv, D)
    x = torch.randn(3, *((6, 6) if kind == "2d" else (40,)), D, requires_grad=True)
    out = block(x)
    ref = _transposing_block(conv, D, x)
    assert out.shape == ref.shape == x.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, x, g)
    (gb,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-5)
    if k % 2:                                                 # odd kernels: the layout stays channels-last
        assert out.is_contiguous()
