"""Exact-count masks for data2vec 2.0 and the index bookkeeping that drops masked tokens.

Convention everywhere: `mask` is (B*M, T) bool, True = masked, rows sample-major
(s0c0, s0c1, ..., s0c{M-1}, s1c0, ...), T in row-major patch order (image) or time (audio/text).

* image: inverse block masking (fairseq `data_utils.compute_block_mask_2d`, inverse_mask=True):
  ~L*(1-p+adjust)/m^2 random m x m *visible* blocks (centres drawn with replacement, clamped at the
  border), then trimmed/filled at random to exactly floor(L*(1-p)) visible patches.
* audio: 1-D blocks of m frames marking *masked* frames (`compute_block_mask_1d`), exactly floor(T*p).
* text: uniform token dropping (`random_masking`), exactly floor(T*(1-p)) kept.
Every clone gets an independent mask. All functions are pure given a `torch.Generator`; the masks
of a training micro-step are drawn from `seed_for(seed, step, micro, rank)` (`step_masks`), in the
data loader's workers ahead of the step (`AheadMasks`) or, for a batch without them, in the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .d2v1 import masks as d2v1_masks
from .errors import D2VError
from .models import token_grid


class MaskError(D2VError, ValueError):
    """A masking configuration that cannot produce a valid mask."""


@dataclass
class MaskInfo:
    mask: torch.Tensor         # (B*M, T) bool, True = masked
    ids_keep: torch.Tensor     # (B*M, T_keep) positions fed to the encoder, in this order
    ids_restore: torch.Tensor  # (B*M, T) inverse of [ids_keep, ids_masked]: un-shuffles the decoder input
    ids_masked: torch.Tensor | None = None   # (B*M, T - T_keep) masked positions, ascending (None: from mask);
    #                                          data2vec 1: (B, K) loss positions (d2v1/masks.py: loss_positions)

    FIELDS = ("mask", "ids_keep", "ids_restore", "ids_masked")

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "MaskInfo":
        mask = mask.bool()
        n_keep = (~mask).sum(1)
        if not bool((n_keep == n_keep[0]).all()):
            raise MaskError(f"rows keep different token counts {sorted(set(n_keep.tolist()))}: "
                            "the student needs the same number of visible tokens in every row")
        ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, ascending
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        k = int(n_keep[0])
        return cls(mask, ids_shuffle[:, :k], ids_restore, ids_shuffle[:, k:])

    def masked_positions(self) -> torch.Tensor:
        """(B*M, T - T_keep) masked positions in ascending order (the row-major order of mask.nonzero)."""
        if self.ids_masked is not None:
            return self.ids_masked
        order = torch.argsort(self.mask.to(torch.int8), dim=1, stable=True)
        return order[:, self.ids_keep.shape[1]:]

    def to(self, device) -> "MaskInfo":
        return MaskInfo(*[None if t is None else t.to(device, non_blocking=True)
                          for t in (self.mask, self.ids_keep, self.ids_restore, self.ids_masked)])

    @classmethod
    def from_batch(cls, batch: dict, step: int, micro: int) -> "MaskInfo | None":
        """The masks a loader worker drew for this batch, if it drew them for micro-step (step, micro)."""
        drawn = batch.get("mask_step")
        if drawn is None or drawn.tolist() != [step, micro]:
            return None
        return cls(*[batch[f] for f in cls.FIELDS])


def seed_for(*parts: int) -> int:
    """A seed that is a pure function of its parts (run seed, step, micro-step, rank, ...)."""
    return hash(parts) & 0x7FFF_FFFF_FFFF


def step_masks(cfg, rows: int, grid: tuple[int, ...], step: int, micro: int, rank: int,
               source: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None) -> MaskInfo:
    """The masks of micro-step (step, micro) on `rank` (cfg: the root Config), on the host. data2vec 1
    (model.algorithm=data2vec): one mask per sample of `source` (host batch) and its loss positions;
    speech spans stay within each row's real frames (`padding_mask`: the batch's, True = pad)."""
    if cfg.model.algorithm == "data2vec":
        code = d2v1_masks.draw(cfg, source, grid, seed_for(cfg.run.seed, step, micro, rank), padding_mask)
        return MaskInfo(code, None, None, d2v1_masks.loss_positions(code))
    gen = torch.Generator().manual_seed(seed_for(cfg.run.seed, step, micro, rank))
    return MaskInfo.from_mask(sample_mask(cfg.mask, rows, grid, gen))


class AheadMasks:
    """Draws each batch's masks in the data loader's workers, off the training step's critical path.
    The batch with index k in this rank's stream is micro-step divmod(k, accumulation) of the run (the
    loop consumes one batch per micro-step); the step checks the (step, micro) the masks were drawn for
    and draws its own when they differ, so masks stay a pure function of (seed, step, micro, rank)."""

    def __init__(self, cfg, rank: int, accumulation: int):
        self.cfg, self.rank, self.accumulation = cfg, rank, accumulation

    def __call__(self, batch: dict, index: int) -> dict:
        step, micro = divmod(index, self.accumulation)
        source = batch["source"]                                              # (B, ...) on the host
        info = step_masks(self.cfg, source.shape[0] * self.cfg.mask.clone_batch,
                          token_grid(self.cfg, source.shape[-1]), step, micro, self.rank, source,
                          batch.get("padding_mask"))
        batch.update({f: getattr(info, f) for f in MaskInfo.FIELDS}, mask_step=torch.tensor([step, micro]))
        return batch


def check_counts(num_tokens: int, mask_prob: float, inverse: bool) -> int:
    """Number of visible tokens per row; raises `MaskError` with the fix when none or all are kept."""
    if not 0.0 < mask_prob < 1.0:
        raise MaskError(f"mask.mask_prob={mask_prob} must be in (0, 1): it is the masked fraction")
    n_keep = int(num_tokens * (1 - mask_prob)) if inverse else num_tokens - int(num_tokens * mask_prob)
    if n_keep < 1 or n_keep >= num_tokens:
        raise MaskError(
            f"mask.mask_prob={mask_prob} on {num_tokens} tokens leaves {n_keep} visible per row; the "
            f"student needs at least 1 visible and 1 masked token: use more tokens (larger input or "
            f"smaller patch) or a mask_prob between {1 / num_tokens:.3f} and {1 - 1 / num_tokens:.3f}")
    return n_keep


def block_mask(rows: int, grid: tuple[int, ...], mask_prob: float, mask_length: int,
               mask_prob_adjust: float, inverse: bool, generator: torch.Generator) -> torch.Tensor:
    """(rows, prod(grid)) bool, True = masked, from m-wide blocks on a 1-D or 2-D grid."""
    L = math.prod(grid)
    check_counts(L, mask_prob, inverse)
    if mask_length > min(grid):
        raise MaskError(f"mask.mask_length={mask_length} is larger than the token grid {grid}: "
                        f"use a mask_length <= {min(grid)} or a larger input")
    p = 1.0 - mask_prob if inverse else mask_prob        # fraction that gets *marked* by blocks
    target = int(L * p)
    n_centres = int(L * (p + mask_prob_adjust) / mask_length ** len(grid))
    marked = torch.zeros(rows, L)
    if n_centres > 0:
        centres = torch.randint(0, L, (rows, n_centres), generator=generator)   # with replacement
        off = torch.arange(mask_length) - mask_length // 2
        if len(grid) == 1:
            idx = (centres[..., None] + off).clamp_(0, L - 1)                    # (rows, n_c, m)
        else:
            h, w = grid
            r = (centres // w)[..., None, None] + off[:, None]                   # (rows, n_c, m, 1)
            c = (centres % w)[..., None, None] + off[None, :]                    # (rows, n_c, 1, m)
            idx = r.clamp(0, h - 1) * w + c.clamp(0, w - 1)                      # (rows, n_c, m, m)
        marked.scatter_(1, idx.reshape(rows, -1), 1.0)
    # exact count: keep `target` marks, un-marking (or adding) uniformly at random
    score = marked + torch.rand(rows, L, generator=generator)                    # marked ones rank first
    chosen = torch.zeros(rows, L, dtype=torch.bool)
    chosen.scatter_(1, score.topk(target, dim=1).indices, True)
    return ~chosen if inverse else chosen


def random_mask(rows: int, num_tokens: int, mask_prob: float, generator: torch.Generator) -> torch.Tensor:
    """(rows, T) bool, True = masked: keep exactly floor(T*(1-p)) tokens uniformly at random."""
    n_keep = check_counts(num_tokens, mask_prob, inverse=True)
    noise = torch.rand(rows, num_tokens, generator=generator)
    mask = torch.ones(rows, num_tokens, dtype=torch.bool)
    mask.scatter_(1, noise.topk(n_keep, dim=1).indices, False)
    return mask


def sample_mask(cfg, rows: int, grid: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """The mask for `rows` = B*M clones on a token grid, per `cfg` (a MaskConfig)."""
    if cfg.mask_length <= 1:
        return random_mask(rows, math.prod(grid), cfg.mask_prob, generator)
    return block_mask(rows, grid, cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust,
                      cfg.inverse_mask, generator)


def check_masks(cfg, grid: tuple[int, ...]) -> None:
    """Raise MaskError / D2v1MaskError now (with the fix) if the root config's masking cannot be met on `grid`."""
    if cfg.model.algorithm == "data2vec":
        d2v1_masks.check(cfg, grid)
    else:
        check_mask(cfg.mask, grid)


def check_mask(cfg, grid: tuple[int, ...]) -> None:
    """Raise MaskError now (with the fix) if `cfg` (a MaskConfig) cannot be met on `grid`."""
    sample_mask(cfg, 1, grid, torch.Generator().manual_seed(0))
