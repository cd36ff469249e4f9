"""Text samples: fixed-length blocks of sentencepiece ids written by `d2v-shard text`."""
from __future__ import annotations

import io

import numpy as np
import torch

from .format import TEXT_EXT


FIRST_WORD_ID = 4          # after fairseq's <s> 0, <pad> 1, </s> 2, <unk> 3


class TextCodec:
    """decode: a sample -> (T,) int64 ids; collate: blocks -> {"source": (B, T)}."""

    def __init__(self, tokens_per_sample: int, vocab_size: int = 0):
        self.length, self.vocab_size = tokens_per_sample, vocab_size

    def decode(self, sample: dict) -> torch.Tensor:
        if TEXT_EXT not in sample:
            raise ValueError(f"sample {sample.get('__key__')} has no .{TEXT_EXT}")
        ids = np.load(io.BytesIO(sample[TEXT_EXT]), allow_pickle=False)
        if ids.ndim != 1 or len(ids) != self.length:
            raise ValueError(f"a block of {ids.shape} tokens; data.tokens_per_sample is {self.length} "
                             "(reshard with d2v-shard text --tokens_per_sample, or set --data.tokens_per_sample)")
        return torch.from_numpy(ids.astype(np.int64))


    def collate(self, items: list[torch.Tensor]) -> dict:
        return {"source": torch.stack(items)}                               # (B, T) token ids

    def synthetic(self, batch_size: int) -> dict:
        """Random word ids of a full block, for benchmarks and the planner (needs vocab_size)."""
        return {"source": torch.randint(FIRST_WORD_ID, self.vocab_size, (batch_size, self.length))}
