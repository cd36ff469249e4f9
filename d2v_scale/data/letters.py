"""The letter dictionary of CTC fine-tuning, in fairseq's `dict.ltr.txt` convention.

A transcript becomes letters as fairseq's `examples/wav2vec/libri_labels.py` writes `.ltr` files:
every character of the words, `|` between words and at the end ("HI YOU" -> H I | Y O U |).
`dict.ltr.txt` holds one `<symbol> <count>` line per letter, most frequent first (fairseq
`Dictionary.save`); the model's output indices follow fairseq's `Dictionary`: `<s>` 0 (the CTC
blank, as fairseq's ctc criterion takes it), `<pad>` 1, `</s>` 2, `<unk>` 3, then the file's
letters in order.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .shards import DataError

WORD_SEP = "|"
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BLANK = 0                    # fairseq: the dictionary's bos "<s>" is the blank of CTC
PAD = 1                      # target padding (never a CTC target)
DICT_FILE = "dict.ltr.txt"


def normalize(text: str) -> str:
    """One line, single spaces: how transcripts are stored in the shards and compared for WER."""
    return " ".join(str(text).split())


def to_letters(text: str) -> list[str]:
    """libri_labels.py: `list(words.replace(" ", "|")) + ["|"]` (words single-spaced)."""
    words = normalize(text)
    return list(words.replace(" ", WORD_SEP)) + [WORD_SEP] if words else []


def letters_to_text(letters: list[str]) -> str:
    """The inverse: letters with `|` word boundaries -> words with single spaces."""
    return normalize("".join(letters).replace(WORD_SEP, " "))


class LetterDict:
    """symbols: the letters in file order (index = 4 + position); counts as read or built."""

    def __init__(self, symbols: list[str], counts: list[int] | None = None):
        if WORD_SEP not in symbols:
            symbols = list(symbols) + [WORD_SEP]
        bad = [s for s in symbols if len(s) != 1 or s.isspace()]
        if bad:
            raise DataError(f"letter dictionary: {bad[0]!r} is not one visible character; each line of "
                            f"{DICT_FILE} is '<character> <count>'")
        self.symbols = list(symbols)
        self.counts = list(counts) if counts is not None else [0] * len(self.symbols)
        self.index = {s: len(SPECIALS) + i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        """Output size of the CTC head: the specials (blank included) and the letters."""
        return len(SPECIALS) + len(self.symbols)

    @classmethod
    def build(cls, transcripts) -> "LetterDict":
        """From training transcripts: letters by count, most frequent first (ties by character)."""
        counts = Counter()
        for t in transcripts:
            counts.update(to_letters(t))
        if not counts:
            raise DataError("no transcript letters to build the dictionary from: the training transcripts are empty")
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([s for s, _ in ordered], [c for _, c in ordered])

    @classmethod
    def load(cls, path: str | Path) -> "LetterDict":
        return cls.parse(Path(path).read_text(encoding="utf-8"), str(path))

    @classmethod
    def parse(cls, text: str, path: str) -> "LetterDict":
        """The letters of a dict.ltr.txt's `text` (`path`: where it came from, for messages)."""
        symbols, counts = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected '<character> <count>' as fairseq's dict.ltr.txt, got {line[:40]!r}")
            if parts[0] in SPECIALS:                         # fairseq writes no specials; tolerate them
                continue
            symbols.append(parts[0])
            counts.append(int(parts[1]))
        if not symbols:
            raise DataError(f"{path} holds no letters; build it from the training transcripts (d2v-shard audio "
                            "--transcripts writes dict.ltr.txt beside the shards)")
        return cls(symbols, counts)

    def text(self) -> str:
        return "".join(f"{s} {c}\n" for s, c in zip(self.symbols, self.counts))

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(self.text(), encoding="utf-8")
        return Path(path)

    def missing(self, text: str) -> list[str]:
        """The characters of `text` the dictionary lacks (sorted)."""
        return sorted({c for c in to_letters(text) if c not in self.index})

    def encode(self, text: str, where: str = "a transcript") -> torch.Tensor:
        """(L,) int64 targets; DataError naming the characters outside the dictionary."""
        letters = to_letters(text)
        try:
            return torch.tensor([self.index[c] for c in letters], dtype=torch.int64)   # (L,)
        except KeyError:
            bad = self.missing(text)
            raise DataError(f"{where} has characters outside the letter dictionary ({' '.join(map(repr, bad))} in "
                            f"{normalize(text)[:60]!r}): normalise the transcripts the same way for --train and "
                            f"--val, or add them to the training transcripts the dictionary is built from") from None

    def decode(self, ids) -> str:
        """Letter indices (no blanks, no repeats collapsed here) -> words; specials are dropped."""
        letters = [self.symbols[i - len(SPECIALS)] for i in map(int, ids) if i >= len(SPECIALS)]
        return letters_to_text(letters)

    def tokens(self) -> list[str]:
        """Every output index's symbol, for the beam decoder (blank as "<s>", word boundary "|")."""
        return list(SPECIALS) + self.symbols
