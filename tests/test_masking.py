import pytest
import torch

from d2v_scale.masking import MaskError, MaskInfo, block_mask, random_mask, sample_mask
from d2v_scale.presets import get_preset


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("preset,grid,visible", [
    ("vit_base_patch16", (14, 14), 39), ("vit_large_patch16", (14, 14), 49), ("vit_huge_patch14", (16, 16), 64)])
def test_inverse_block_mask_exact_visible_counts(preset, grid, visible):
    cfg = get_preset(preset)
    assert cfg.model.image.img_size // cfg.model.image.patch_size == grid[0]
    mask = sample_mask(cfg.mask, 16 * cfg.mask.clone_batch, grid, gen())
    assert mask.shape == (16 * cfg.mask.clone_batch, grid[0] * grid[1])
    assert ((~mask).sum(1) == visible).all()


def test_audio_and_text_counts():
    audio = block_mask(8, (999,), 0.5, 5, 0.05, inverse=False, generator=gen())
    assert (audio.sum(1) == 499).all()
    large = block_mask(8, (999,), 0.55, 5, 0.1, inverse=False, generator=gen())
    assert (large.sum(1) == int(999 * 0.55)).all()
    text = random_mask(16, 512, 0.48, gen())
    assert ((~text).sum(1) == 266).all() and (text.sum(1) == 246).all()


def test_visible_patches_come_in_blocks():
    """Inverse masking keeps mostly 3x3 blocks: visible patches have far more visible neighbours than
    uniformly random ones would."""
    mask = block_mask(256, (14, 14), 0.8, 3, 0.07, inverse=True, generator=gen())
    vis = (~mask).view(-1, 14, 14).float()
    neigh = torch.nn.functional.conv2d(vis[:, None], torch.ones(1, 1, 3, 3), padding=1)[:, 0] - vis
    blocky = (neigh * vis).sum() / vis.sum()
    rand = random_mask(256, 196, 0.8, gen()).logical_not().view(-1, 14, 14).float()
    neigh_r = torch.nn.functional.conv2d(rand[:, None], torch.ones(1, 1, 3, 3), padding=1)[:, 0] - rand
    assert blocky > 3 * (neigh_r * rand).sum() / rand.sum()


def test_clones_are_independent_and_reproducible():
    a = block_mask(16, (14, 14), 0.8, 3, 0.07, True, gen(1))
    assert len({tuple(r.tolist()) for r in a}) == 16
    assert torch.equal(a, block_mask(16, (14, 14), 0.8, 3, 0.07, True, gen(1)))


def test_mask_info_keeps_visible_and_restores_order():
    mask = block_mask(6, (8, 8), 0.75, 3, 0.1, True, gen())
    info = MaskInfo.from_mask(mask)
    T = mask.shape[1]
    assert info.ids_keep.shape == (6, int(T * 0.25))
    assert not mask.gather(1, info.ids_keep).any()                       # kept = visible
    x = torch.arange(T).expand(6, T)
    shuffled = torch.cat([x.gather(1, info.ids_keep), x.gather(1, (~mask).logical_not().nonzero()[:, 1].view(6, -1))], 1)
    assert torch.equal(shuffled.gather(1, info.ids_restore), x)          # un-shuffle restores positions


@pytest.mark.parametrize("kwargs,msg", [
    (dict(grid=(4, 4), p=0.99), "leaves 0 visible"),
    (dict(grid=(4, 4), p=1.0), "must be in"),
    (dict(grid=(2, 2), p=0.5, m=3), "larger than the token grid"),
])
def test_unsatisfiable_masks_name_the_problem(kwargs, msg):
    with pytest.raises(MaskError, match=msg):
        block_mask(2, kwargs["grid"], kwargs["p"], kwargs.get("m", 3), 0.07, True, gen())


def test_rows_with_different_counts_are_rejected():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(MaskError, match="different token counts"):
        MaskInfo.from_mask(mask)
