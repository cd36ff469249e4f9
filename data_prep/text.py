"""Text: a sentencepiece vocabulary and fixed-length token blocks (fairseq `sample_break_mode: none`).

Documents are the files of SRC, split at blank lines. Every line is encoded and ends with </s>;
the token stream runs across line and document boundaries and is cut into blocks of
`tokens_per_sample - 1`, each prefixed with <s>, as fairseq's masked_lm task does with a
TokenBlockDataset(break_mode="none") + PrependTokenDataset(bos). The ids use fairseq's Dictionary
layout (bos 0, pad 1, eos 2, unk 3), so a d2v_scale text model lines up with fairseq's.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import sys

import numpy as np
import sentencepiece as spm

from d2v_scale.data.format import CLASS_EXT, SOURCE_EXT, TEXT_EXT

BOS, PAD, EOS, UNK = 0, 1, 2, 3
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}


def find_text(src: str) -> list[str]:
    p = Path(src)
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                  and not f.name.startswith("."))


def read_lines(path: str) -> list[str]:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"unreadable: {e}") from None
    if b"\x00" in raw[:4096]:
        raise ValueError("binary file, not text")
    return [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines()]


def text_problem(path: str) -> str | None:
    """Why `path` is not a text file (unreadable, binary), from its first 4 kB; None if it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    return "binary file, not text" if b"\x00" in head else None


def train_spm(corpus: str, model_prefix: str, vocab_size: int, model_type: str = "unigram",
              max_sentences: int = 2_000_000, seed: int = 0) -> str:
    files = []
    for f in find_text(corpus):
        if problem := text_problem(f):
            print(f"d2v-shard: skipping {f}: {problem}", file=sys.stderr, flush=True)
        else:
            files.append(f)
    if not files:
        raise ValueError(f"{corpus}: no text files (after skipping unreadable and binary ones)")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)

    def sentences():
        for f in files:
            for line in read_lines(f):
                if line:
                    yield line

    spm.set_random_generator_seed(seed)
    tmp = model_prefix + ".partial"                   # PREFIX.partial.{model,vocab}, renamed when complete
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_prefix=tmp, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, bos_id=BOS, pad_id=PAD, eos_id=EOS, unk_id=UNK,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=2, minloglevel=2)
        os.replace(tmp + ".vocab", model_prefix + ".vocab")
        os.replace(tmp + ".model", model_prefix + ".model")      # last: a .model is always complete
    except BaseException:
        for ext in (".model", ".vocab"):
            Path(tmp + ext).unlink(missing_ok=True)
        raise
    return model_prefix + ".model"


_processors: dict[str, object] = {}


def encode_text_file(path: str, spm_model: str) -> np.ndarray:
    """All lines of one file as ids, each line followed by </s> (blank lines: document breaks, dropped)."""
    sp = _processors.get(spm_model)
    if sp is None:
        sp = _processors[spm_model] = spm.SentencePieceProcessor(model_file=spm_model)
    ids = []
    for line in read_lines(path):
        if line:
            ids.extend(sp.encode(line))
            ids.append(EOS)
    if not ids:
        raise ValueError("no text")
    return np.asarray(ids, dtype=np.int32)


class BlockPacker:
    """Cuts the running token stream into <s> + (tokens_per_sample - 1) token blocks, stored as
    uint16 when the vocabulary fits (half the bytes of int32), int32 otherwise."""

    def __init__(self, tokens_per_sample: int, vocab_size: int):
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        self.body = tokens_per_sample - 1
        self.buf = np.zeros(0, dtype=np.int32)
        self.blocks = 0
        self.tail_dropped = 0

    def feed(self, ids: np.ndarray, source: str):
        self.buf = np.concatenate([self.buf, ids])
        while len(self.buf) >= self.body:
            block = np.concatenate([[BOS], self.buf[: self.body]]).astype(self.dtype)
            self.buf = self.buf[self.body:]
            self.blocks += 1
            out = io.BytesIO()
            np.save(out, block)
            yield {TEXT_EXT: out.getvalue(), SOURCE_EXT: source}

    def finish(self):
        self.tail_dropped = len(self.buf)          # a last partial block is not a full sample
        return []


class DocumentBlocks:
    """Labelled text: each document (file) is cut into its own <s> + (tokens_per_sample - 1) blocks,
    the last one filled with <pad> (a label belongs to one document, so blocks never cross documents);
    every block carries the document's class. `labels`: {file key: class index}."""

    def __init__(self, tokens_per_sample: int, vocab_size: int, labels: dict[str, int]):
        self.dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        self.body, self.labels = tokens_per_sample - 1, labels
        self.padded = 0

    def feed(self, ids: np.ndarray, source: str):
        for start in range(0, len(ids), self.body):
            body = ids[start:start + self.body]
            block = np.full(self.body + 1, PAD, dtype=self.dtype)
            block[0], block[1:1 + len(body)] = BOS, body
            self.padded += self.body - len(body)
            out = io.BytesIO()
            np.save(out, block)
            yield {TEXT_EXT: out.getvalue(), CLASS_EXT: str(self.labels[source]), SOURCE_EXT: source}

    def finish(self):
        return []

    def stats(self) -> dict:
        return {"tokens_per_sample": self.body + 1, "pad_tokens": self.padded}
