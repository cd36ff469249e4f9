"""CTC decoding and word/character error rates.

Greedy: the best index per frame, repeats collapsed, blanks (and the other specials) dropped, as
fairseq's `examples/speech_recognition/w2l_decoder.py: W2lViterbiDecoder` without a lexicon does.
Beam: torchaudio's `ctc_decoder` (flashlight-text's lexicon decoder), with an optional lexicon
(`word<TAB>l e t t e r s |` per line, fairseq/flashlight format) and KenLM model (binary or ARPA),
weights `lm_weight` and `word_score` as flashlight names them. WER/CER: edit distance over words and
over characters (spaces included, as fairseq's `wer` / `uer` in its ctc criterion), summed over the
utterances, divided by the reference lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchaudio.functional import edit_distance

from ..config import ConfigError, LMConfig
from ..data.letters import BLANK, SPECIALS, WORD_SEP, LetterDict, normalize


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, letters: LetterDict) -> list[str]:
    """logits (B, T, V), lengths (B,) -> B transcripts."""
    best = logits.argmax(-1).cpu()                                             # (B, T)
    out = []
    for row, n in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[:n])                               # (T',) repeats collapsed
        out.append(letters.decode([i for i in ids.tolist() if i != BLANK]))
    return out


@dataclass
class ErrorCounts:
    """Edit operations and reference lengths, summed over utterances (all-reducible)."""
    word_errors: int = 0
    words: int = 0
    char_errors: int = 0
    chars: int = 0

    def add(self, hyp: str, ref: str) -> None:
        h, r = normalize(hyp), normalize(ref)
        self.word_errors += edit_distance(r.split(), h.split())
        self.words += len(r.split())
        self.char_errors += edit_distance(list(r), list(h))
        self.chars += len(r)

    def as_list(self) -> list[float]:
        return [self.word_errors, self.words, self.char_errors, self.chars]

    @staticmethod
    def rates(counts) -> dict[str, float]:
        """[word_errors, words, char_errors, chars] -> {"wer", "cer"} in percent."""
        we, w, ce, c = [float(v) for v in counts]
        return {"wer": 100.0 * we / max(w, 1.0), "cer": 100.0 * ce / max(c, 1.0)}


def error_rates(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """WER and CER (percent) of hypotheses against references."""
    counts = ErrorCounts()
    for h, r in zip(hyps, refs):
        counts.add(h, r)
    return ErrorCounts.rates(counts.as_list())


def write_lexicon(words, path) -> None:
    """A flashlight lexicon for `words`: `WORD<TAB>W O R D |` per line (fairseq's format)."""
    lines = sorted({w for w in words if w})
    with open(path, "w", encoding="utf-8") as f:
        for w in lines:
            f.write(f"{w}\t{' '.join(w)} {WORD_SEP}\n")


class BeamDecoder:
    """torchaudio `ctc_decoder` over the letter dictionary: emissions (B, T, V) -> B transcripts."""

    def __init__(self, letters: LetterDict, lm: LMConfig):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except (ImportError, RuntimeError, OSError):       # torchaudio says so when flashlight-text is missing
            raise ConfigError("beam search needs flashlight-text: pip install 'd2v_scale[decode]' (or "
                              "flashlight-text), or decode greedily (no --lm.lexicon / --lm.kenlm)") from None
        if lm.kenlm and not lm.lexicon:
            raise ConfigError("--lm.kenlm needs --lm.lexicon FILE (word<TAB>spelling per line): the word LM scores "
                              "lexicon words")
        self.letters = letters
        try:
            self.decoder = ctc_decoder(
                lexicon=lm.lexicon or None, tokens=letters.tokens(), lm=lm.kenlm or None, beam_size=lm.beam,
                beam_threshold=lm.beam_threshold, lm_weight=lm.weight, word_score=lm.word_score,
                blank_token=SPECIALS[BLANK], sil_token=WORD_SEP,
                unk_word=SPECIALS[3])
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"the beam decoder cannot be built from --lm.lexicon {lm.lexicon or '-'} --lm.kenlm "
                              f"{lm.kenlm or '-'} ({str(e).splitlines()[0][:200]}): check the files' formats "
                              "(lexicon: word<TAB>l e t t e r s |, letters from the run's dict.ltr.txt)") from None
        self.lexicon_free = not lm.lexicon

    def __call__(self, logits: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        emissions = logits.float().log_softmax(-1).cpu().contiguous()                    # (B, T, V)
        emissions[..., 1:len(SPECIALS)] = -1e4            # <pad> </s> <unk> are never targets
        hyps = self.decoder(emissions, lengths.to(torch.int32).cpu())
        out = []
        for nbest in hyps:
            if not nbest:
                out.append("")
                continue
            best = nbest[0]
            if self.lexicon_free:
                out.append(self.letters.decode([i for i in best.tokens.tolist() if i != BLANK]))
            else:
                out.append(normalize(" ".join(best.words)))
        return out
