"""Text samples: fixed-length blocks of sentencepiece ids written by `d2v-shard text` (pretraining), and
labelled sentence(-pair) sequences written by `d2v-shard glue` (fine-tuning, `SentenceCodec`)."""
from __future__ import annotations

import io

import numpy as np
import torch

from .format import CLASS_EXT, TARGET_EXT, TEXT_EXT
from .shards import DataError


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


class SentenceCodec:
    """GLUE-style sentence(-pair) samples written by `d2v-shard glue`: one `<s> a </s>[</s> b </s>]`
    id sequence each, of any length up to max_positions, with a class (`cls`) or, for a regression task,
    a float target (`target`). decode -> (ids (T,), label); collate pads to the batch's longest with
    <pad> -> {"source": (B, T), "padding_mask": (B, T) True = pad, "label": (B,) int64 classes, or float32
    targets of a regression task}, as fairseq's sentence_prediction task batches them (RightPadDataset)."""

    def __init__(self, max_positions: int, vocab_size: int, num_classes: int = 0, regression: bool = False,
                 pad_idx: int = 1):
        self.max_positions, self.vocab_size, self.pad_idx = max_positions, vocab_size, pad_idx
        self.num_classes, self.regression = num_classes, regression

    def decode(self, sample: dict):
        if TEXT_EXT not in sample:
            raise ValueError(f"sample {sample.get('__key__')} has no .{TEXT_EXT}")
        ids = np.load(io.BytesIO(sample[TEXT_EXT]), allow_pickle=False)
        if ids.ndim != 1 or not 2 <= len(ids) <= self.max_positions:
            raise ValueError(f"sample {sample.get('__key__')}: {ids.shape} tokens; the encoder takes 2 to "
                             f"{self.max_positions} (reshard with d2v-shard glue --max_positions {self.max_positions})")
        if self.vocab_size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"sample {sample.get('__key__')}: token id {int(ids.max())} is outside the encoder's "
                             f"{self.vocab_size}-piece vocabulary: shard with the pretraining run's --spm model")
        key = TARGET_EXT if self.regression else CLASS_EXT
        if key not in sample:
            raise ValueError(f"sample {sample.get('__key__')} has no .{key} ("
                             + ("a regression task needs d2v-shard glue --regression shards)" if self.regression
                                else "a classification task needs class labels; were these regression shards?)"))
        label = float(sample[key]) if self.regression else int(sample[key])
        return torch.from_numpy(ids.astype(np.int64)), label

    def collate(self, items: list) -> dict:
        T = max(len(x) for x, _ in items)
        source = torch.full((len(items), T), self.pad_idx, dtype=torch.int64)          # (B, T)
        for i, (x, _) in enumerate(items):
            source[i, :len(x)] = x
        labels = [y for _, y in items]
        if self.regression:
            return {"source": source, "padding_mask": source.eq(self.pad_idx),
                    "label": torch.tensor(labels, dtype=torch.float32)}                  # (B,) targets
        y = torch.tensor(labels, dtype=torch.int64)                                      # (B,)
        if self.num_classes and (int(y.max()) >= self.num_classes or int(y.min()) < 0):
            raise DataError(f"a sample has class {int(y.max())} but the head has {self.num_classes} classes: "
                            "shard the training and validation TSVs with the same --label_names")
        return {"source": source, "padding_mask": source.eq(self.pad_idx), "label": y}

    def synthetic(self, batch_size: int) -> dict:
        """A batch of `<s> w </s>` (padding batches of evaluation, benchmarks)."""
        source = torch.tensor([[0, FIRST_WORD_ID, 2]] * batch_size)                      # (B, 3)
        out = {"source": source, "padding_mask": torch.zeros_like(source, dtype=torch.bool)}
        return {**out, "label": torch.zeros(batch_size, dtype=torch.float32 if self.regression else torch.int64)}
