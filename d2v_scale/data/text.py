"""Text samples: fixed-length blocks of sentencepiece ids written by `d2v-shard text`."""
from __future__ import annotations

import io

import numpy as np
import torch

from .format import TEXT_EXT


class TextDecoder:
    def __init__(self, tokens_per_sample: int):
        self.length = tokens_per_sample

    def __call__(self, sample: dict) -> torch.Tensor:
        if TEXT_EXT not in sample:
            raise ValueError(f"sample {sample.get('__key__')} has no .{TEXT_EXT}")
        ids = np.load(io.BytesIO(sample[TEXT_EXT]), allow_pickle=False)
        if ids.ndim != 1 or len(ids) != self.length:
            raise ValueError(f"a block of {ids.shape} tokens; data.tokens_per_sample is {self.length} "
                             "(reshard with d2v-shard text --tokens_per_sample, or set --data.tokens_per_sample)")
        return torch.from_numpy(ids.astype(np.int64))


def collate(items: list[torch.Tensor]) -> dict:
    return {"source": torch.stack(items)}                                   # (B, T) token ids
