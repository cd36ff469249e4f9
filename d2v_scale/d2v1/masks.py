"""The three data2vec 1 maskings, one mask per sample (no clones), True = masked.

* block (images): BEiT's block-wise masking, data2vec_vision `beit/masking_generator.py:
  MaskingGenerator`: rectangles of 16..max patches with log-uniform aspect ratio in [0.3, 1/0.3]
  added until `num_mask_patches` are covered (a rectangle must add 1..max new patches; after 10
  failed tries the image keeps what it has, so a few images end slightly under the target).
* span (speech): wav2vec 2.0's spans, fairseq `data/data_utils.py: compute_mask_indices` as
  data2vec_audio calls it (static lengths, overlap allowed, the frame padding passed): each row draws
  max(min_masks, int(p * len / span + U)) distinct starts in [0, len - span) over its own real length
  `len` (the range widened to num + 1 starts when that leaves too few), spans clipped at `len`, so no
  padded frame is masked; then `require_same_masks`: every row keeps as many masked frames as the
  row with the fewest, dropped at random.
* bert (text): fairseq `data/mask_tokens_dataset.py: MaskTokensDataset` with
  `mask_multiple_length`: int(p * T / span + U) starts, each masking `span` tokens; of those,
  `leave_unmasked_prob` stay as they are and `random_token_prob` become a random token. As in
  fairseq, only the tokens that became `<mask>` carry the loss (`src_tokens.eq(mask_idx)`).

All draws are a pure function of one seed (`seed_for(seed, step, micro, rank)` in training). The
text mask is an int64 code when tokens are replaced at random: 1 = `<mask>`, v >= 2 = token v - 2.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import D2VError
from ..models.audio import frames_for


class D2v1MaskError(D2VError, ValueError):
    """A data2vec 1 masking setting that cannot produce a mask on this input."""


def block_mask(grid: tuple[int, int], num_masking: int, min_patches: int, max_patches: int,
               min_aspect: float, rng: np.random.Generator) -> np.ndarray:
    """(h*w,) bool, one image, as BEiT's MaskingGenerator.__call__."""
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        budget = min(num_masking - count, max_patches)
        delta = 0
        for _ in range(10):
            area = min_patches + (budget - min_patches) * rng.random()    # python's uniform: budget may be lower
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
            bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    return mask.reshape(-1)


def span_mask(lengths: list[int], T: int, prob: float, span: int, min_masks: int,
              rng: np.random.Generator) -> np.ndarray:
    """(B, T) bool: the spans of each row within its real length (`lengths`, frames), as fairseq's
    compute_mask_indices (mask_type static, no_overlap False) draws them."""
    mask = np.zeros((len(lengths), T), dtype=bool)
    for i, sz in enumerate(lengths):
        num = max(min_masks, int(prob * sz / float(span) + rng.random()))
        if num == 0:                                              # min_masks 0 on a short row
            continue
        low = span if sz - span > num else sz - num - 1           # fairseq: widen the start range when short
        starts = rng.choice(sz - low, num, replace=False)                       # (num,)
        idx = (starts[:, None] + np.arange(span)[None]).reshape(-1)             # (num * span,)
        idx = np.unique(idx[idx < sz])
        if len(idx) >= sz:
            raise D2v1MaskError(f"mask.mask_prob={prob} x mask.mask_length={span} masks every one of a row's {sz} "
                                "real frames: lower mask.mask_prob or raise data.min_sample_size")
        mask[i, idx] = True
    return mask


def frame_lengths(cfg, padding_mask: torch.Tensor | None, B: int, T: int) -> list[int]:
    """Real frames per row (the CNN's output length of each row's unpadded samples; T without padding)."""
    if padding_mask is None:
        return [T] * B
    spec = cfg.model.audio.feature_encoder_spec
    return [min(T, max(0, frames_for(spec, int(n)))) for n in (~padding_mask).sum(-1).tolist()]


def same_count(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every row keeps as many masked positions as the row with the fewest (dropped at random)."""
    keep = int(mask.sum(1).min())
    for row in mask:
        idx = np.flatnonzero(row)
        if len(idx) > keep:
            row[rng.choice(idx, len(idx) - keep, replace=False)] = False
    return mask


def bert_mask(tokens: torch.Tensor, prob: float, span: int, leave_unmasked: float, random_token: float,
              vocab_size: int, pad_idx: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, T) int64 code: 0 = as is, 1 = `<mask>`, v >= 2 = replaced by token v - 2. Pads are never chosen."""
    B, T = tokens.shape
    code = np.zeros((B, T), dtype=np.int64)
    for i in range(B):
        real = np.flatnonzero(tokens[i].numpy() != pad_idx)
        sz = len(real)
        num = int(prob * sz / float(span) + rng.random())
        starts = rng.choice(sz, num, replace=False)
        idx = (starts[:, None] + np.arange(span)[None]).reshape(-1)
        chosen = np.zeros(sz, dtype=bool)
        chosen[idx[idx < sz]] = True
        row = chosen.astype(np.int64)
        if leave_unmasked + random_token > 0:
            other = chosen & (rng.random(sz) < leave_unmasked + random_token)
            rand = other & (rng.random(sz) < random_token / (leave_unmasked + random_token))
            row[other] = 0
            row[rand] = 2 + rng.integers(0, vocab_size, int(rand.sum()))
        code[i, real] = row
    return torch.from_numpy(code)


def loss_mask(code: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True = the token carries the loss (`<mask>`), from a mask or the text code."""
    return code if code.dtype == torch.bool else code == 1


def loss_positions(code: torch.Tensor) -> torch.Tensor:
    """(B, K) int64: each row's loss positions in ascending order (the row-major order of `x[mask]`),
    K the most of any row; a shorter row ends with positions that carry none. K is read from the
    data: made on the host with the masks (the step gets them with the batch, nothing waits)."""
    loss = loss_mask(code)
    order = torch.argsort((~loss).to(torch.int8), dim=1, stable=True)     # (B, T) loss positions first
    return order[:, : int(loss.sum(1).max())] if loss.numel() else order[:, :0]


def draw(cfg, source: torch.Tensor, grid: tuple[int, ...], seed: int,
         padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The masks of one micro-batch (cfg: the root Config): (B, T) bool, or the text code (int64).
    padding_mask: the batch's (B, S) sample padding (True = pad), speech: spans within each row's
    real frames."""
    d, B = cfg.model.d2v1, source.shape[0]
    rng = np.random.default_rng(seed)
    if d.masking == "block":
        hi = d.max_mask_patches_per_block or d.num_mask_patches
        rows = [block_mask(grid, d.num_mask_patches, d.min_mask_patches_per_block, hi, d.min_aspect, rng)
                for _ in range(B)]
        return torch.from_numpy(np.stack(rows))
    if d.masking == "span":
        T = math.prod(grid)
        lengths = frame_lengths(cfg, padding_mask, B, T)
        mask = span_mask(lengths, T, cfg.mask.mask_prob, cfg.mask.mask_length, d.min_masks, rng)
        return torch.from_numpy(same_count(mask, rng) if d.require_same_masks else mask)
    if d.masking == "bert":
        t = cfg.model.text
        code = bert_mask(source, cfg.mask.mask_prob, cfg.mask.mask_length, d.leave_unmasked_prob,
                         d.random_token_prob, t.vocab_size, t.pad_idx, rng)
        return code if d.random_token_prob > 0 else code.bool()
    raise D2v1MaskError(f"model.d2v1.masking={d.masking!r}: choose block, span or bert")


def check(cfg, grid: tuple[int, ...]) -> None:
    """Raise D2v1MaskError (with the fix) now if the masking cannot be met on `grid`."""
    d, T = cfg.model.d2v1, math.prod(grid)
    if d.masking == "block":
        if len(grid) != 2:
            raise D2v1MaskError("model.d2v1.masking=block needs an image (2-D patch grid); use span or bert")
        if not 0 < d.num_mask_patches < T:
            raise D2v1MaskError(f"model.d2v1.num_mask_patches={d.num_mask_patches} on {T} patches: use 1..{T - 1}")
        if d.min_mask_patches_per_block > d.num_mask_patches:
            raise D2v1MaskError(f"model.d2v1.min_mask_patches_per_block={d.min_mask_patches_per_block} is more "
                                f"than num_mask_patches={d.num_mask_patches}: lower it")
    elif d.masking in ("span", "bert"):
        if not 0 < cfg.mask.mask_prob < 1:
            raise D2v1MaskError(f"mask.mask_prob={cfg.mask.mask_prob}: must be in (0, 1)")
        if cfg.mask.mask_length < 1 or cfg.mask.mask_length >= T:
            raise D2v1MaskError(f"mask.mask_length={cfg.mask.mask_length} on {T} tokens: use 1..{T - 1}")
        if d.masking == "bert" and d.leave_unmasked_prob + d.random_token_prob > 1:
            raise D2v1MaskError("model.d2v1.leave_unmasked_prob + random_token_prob > 1: they split the chosen tokens")
    else:
        raise D2v1MaskError(f"model.d2v1.masking={d.masking!r}: choose block, span or bert")
