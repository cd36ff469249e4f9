"""Image samples: decode + the reference augmentation (fairseq `mae_image_dataset.py`).

RandomResizedCrop(img_size, scale (0.2, 1), bicubic), horizontal flip, ImageNet mean/std.
No colour jitter. Randomness comes from torch's global RNG, which the stream seeds per sample.
"""
from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from .format import image_ext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageCodec:
    """decode: a sample -> augmented (3, H, W) image; collate: images -> {"source": (B, 3, H, W)}."""

    def __init__(self, img_size: int, crop_scale: tuple[float, float], in_chans: int = 3):
        self.img_size, self.in_chans = img_size, in_chans
        self.tf = T.Compose([
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
        with Image.open(io.BytesIO(sample[ext])) as im:
            return self.tf(im.convert("RGB"))                        # (3, H, W)


    def collate(self, items: list[torch.Tensor]) -> dict:
        return {"source": torch.stack(items)}                        # (B, 3, H, W)

    def synthetic(self, batch_size: int) -> dict:
        """A batch of the shape training sees, for benchmarks and the planner."""
        return {"source": torch.randn(batch_size, self.in_chans, self.img_size, self.img_size)}
