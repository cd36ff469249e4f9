"""Image samples: decode + the reference augmentation (fairseq `mae_image_dataset.py`).

Pretraining: RandomResizedCrop(img_size, scale (0.2, 1), bicubic), horizontal flip, ImageNet
mean/std, no colour jitter; randomness from torch's global RNG, which the stream seeds per sample.
Fine-tuning and evaluation (fairseq `mae_finetuning_image_dataset.py: build_transform`): timm's
`create_transform` (RandAugment, random erasing) and resize + centre crop.
Every image is opened through `open_image`, which refuses one above a pixel limit from its header,
before decoding (a 13,000 x 13,000 PNG is a few hundred KB on disk and ~0.5 GB decoded).
"""
from __future__ import annotations

import io
import random
import warnings

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import v2 as T

from .format import image_ext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 64_000_000   # width x height: every camera photo up to 64 MP; training crops to 224 anyway


class ImageTooLarge(ValueError):
    """An image whose header gives more pixels than the limit; it is skipped, never decoded."""


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The (not yet decoded) PIL image of `data`; ImageTooLarge when its header says more than `max_pixels`.
    PIL's own decompression-bomb limit is raised to `max_pixels` when that is higher, so ours governs."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image too large to decode ({e}); the limit is {max_pixels:,} pixels") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageTooLarge(f"image of {w} x {h} = {w * h:,} pixels is above the limit of {max_pixels:,} (it is not "
                         "decoded); raise the limit (--data.max_image_pixels, d2v-shard --max_pixels) or shrink it")
    return im


def finetune_transform(img_size: int, cfg) -> object:
    """cfg: FinetuneConfig. timm's ImageNet training transform: RandomResizedCrop (0.08-1), flip,
    RandAugment, ImageNet mean/std, random erasing (fairseq build_transform(is_train=True))."""
    policy = None if cfg.auto_augment in ("", "none") else cfg.auto_augment
    return create_transform(img_size, is_training=True, scale=tuple(cfg.crop_scale), auto_augment=policy,
                            interpolation="bicubic", re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(img_size: int, crop_pct: float = 224 / 256) -> T.Compose:
    """Resize the short side to img_size / crop_pct (bicubic), centre crop, normalise (no randomness)."""
    return T.Compose([
        T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(img_size),
        T.ToImage(), T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageCodec:
    """decode: a sample -> augmented (3, H, W) image; collate: images -> {"source": (B, 3, H, W)}.
    `transform` replaces the pretraining augmentation (fine-tuning, evaluation); `reseed`: seed Python's
    and numpy's RNGs from the stream's per-sample torch seed before it (timm's crop, RandAugment and
    random erasing draw from them), so that a resumed run replays the same augmentation."""

    def __init__(self, img_size: int, crop_scale: tuple[float, float], in_chans: int = 3, transform=None,
                 reseed: bool = False, max_pixels: int = MAX_IMAGE_PIXELS):
        self.img_size, self.in_chans, self.max_pixels = img_size, in_chans, max_pixels
        self.reseed = reseed
        self.tf = transform or T.Compose([
            T.RandomResizedCrop(img_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC,
                                antialias=True),
            T.RandomHorizontalFlip(),
            T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def decode(self, sample: dict) -> torch.Tensor:
        ext = image_ext(sample)
        if ext is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image ({', '.join(k for k in sample if not k.startswith('__'))})")
        if self.reseed:
            random.seed(torch.initial_seed())
            np.random.seed(torch.initial_seed() & 0xFFFF_FFFF)
        with open_image(sample[ext], self.max_pixels) as im:
            return self.tf(im.convert("RGB"))                        # (3, H, W)


    def collate(self, items: list[torch.Tensor]) -> dict:
        return {"source": torch.stack(items)}                        # (B, 3, H, W)

    def synthetic(self, batch_size: int) -> dict:
        """A batch of the shape training sees, for benchmarks and the planner."""
        return {"source": torch.randn(batch_size, self.in_chans, self.img_size, self.img_size)}
