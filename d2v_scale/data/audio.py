"""Audio samples: flac decode, per-utterance waveform normalisation, batch cropping or padding.

As fairseq's RawAudioDataset (`normalize: true`): each utterance is layer-normalised over its
samples; a batch is cropped to its shortest utterance (at most max_sample_size) at a random offset
per utterance, or with `data.pad_audio` padded to its longest with a padding mask. Utterances
shorter than min_sample_size are left out (counted, not warned about). `TranscribedAudio` pads
instead of cropping and adds the letter targets of each sample's transcript (CTC fine-tuning).
"""
from __future__ import annotations

import dataclasses
import io

import soundfile as sf
import torch
import torch.nn.functional as F

from .format import AUDIO_EXT, SAMPLE_RATE, TRANSCRIPT_EXT
from .letters import PAD, normalize


class TooShort(Exception):
    """A sample the recipe leaves out on purpose (not a decoding error)."""


class AudioCodec:
    """decode: a sample -> normalised (S,) waveform; collate: waveforms -> {"source": (B, S)} cropped
    to the shortest, or padded to the longest with {"padding_mask": (B, S)} (True = pad)."""

    def __init__(self, cfg):
        """cfg: DataConfig."""
        self.normalize, self.min_size = cfg.normalize, cfg.min_sample_size
        self.pad, self.max_size = cfg.pad_audio, cfg.max_sample_size

    def decode(self, sample: dict) -> torch.Tensor:
        if AUDIO_EXT not in sample:
            raise ValueError(f"sample {sample.get('__key__')} has no .{AUDIO_EXT}")
        wav, sr = sf.read(io.BytesIO(sample[AUDIO_EXT]), dtype="float32", always_2d=True)
        if sr != SAMPLE_RATE:
            raise ValueError(f"{sr} Hz audio; shards must be 16 kHz (d2v-shard audio resamples)")
        x = torch.from_numpy(wav.mean(axis=1))                              # (S,)
        if len(x) < self.min_size:
            raise TooShort(f"{len(x)} samples < data.min_sample_size {self.min_size}")
        return F.layer_norm(x, x.shape) if self.normalize else x

    def _crop(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if len(x) <= size:
            return x
        start = int(torch.randint(0, len(x) - size + 1, ()))
        return x[start:start + size]

    def collate(self, items: list[torch.Tensor]) -> dict:
        sizes = [len(x) for x in items]
        if not self.pad:
            target = min(min(sizes), self.max_size)
            return {"source": torch.stack([self._crop(x, target) for x in items])}   # (B, S)
        target = min(max(sizes), self.max_size)
        source = torch.zeros(len(items), target)
        padding = torch.ones(len(items), target, dtype=torch.bool)
        for i, x in enumerate(items):
            x = self._crop(x, target)
            source[i, : len(x)] = x
            padding[i, : len(x)] = False
        return {"source": source, "padding_mask": padding}                            # (B, S), True = pad

    def synthetic(self, batch_size: int) -> dict:
        """A batch of the longest utterances training crops to, for benchmarks and the planner."""
        return {"source": torch.randn(batch_size, self.max_size)}                     # (B, S)


class TranscribedAudio:
    """CTC fine-tuning samples: decode -> (normalised (S,) waveform, transcript, where); collate -> padded
    {"source" (B, S), "padding_mask" (B, S), "target" (B, L) letter indices padded with <pad>,
    "target_lengths" (B,), "text" [B transcripts]}. Utterances are never cropped (their transcripts
    would no longer match): one longer than data.max_sample_size is left out with a warning."""

    def __init__(self, cfg, letters):
        """cfg: DataConfig; letters: letters.LetterDict."""
        self.audio = AudioCodec(dataclasses.replace(cfg, pad_audio=True))
        self.letters = letters

    def decode(self, sample: dict):
        if TRANSCRIPT_EXT not in sample:
            raise ValueError(f"sample {sample.get('__key__')} has no transcript (.{TRANSCRIPT_EXT})")
        wav = self.audio.decode(sample)
        if len(wav) > self.audio.max_size:
            raise ValueError(f"{len(wav)} samples > data.max_sample_size {self.audio.max_size}: a transcribed "
                             "utterance is not cropped; raise --data.max_sample_size")
        text = sample[TRANSCRIPT_EXT]
        where = f"the transcript of {sample.get('__url__', 'a shard')}:{sample.get('__key__')}"
        return wav, normalize(text.decode("utf-8") if isinstance(text, bytes) else text), where

    def collate(self, items: list) -> dict:
        batch = self.audio.collate([w for w, _, _ in items])
        targets = [self.letters.encode(t, where) for _, t, where in items]
        lengths = torch.tensor([len(t) for t in targets], dtype=torch.int64)                # (B,)
        padded = torch.full((len(items), max(1, int(lengths.max()))), PAD, dtype=torch.int64)   # (B, L)
        for i, t in enumerate(targets):
            padded[i, : len(t)] = t
        return {**batch, "target": padded, "target_lengths": lengths, "text": [t for _, t, _ in items]}

    def synthetic(self, batch_size: int) -> dict:
        S = self.audio.max_size
        return {"source": torch.randn(batch_size, S), "padding_mask": torch.zeros(batch_size, S, dtype=torch.bool),
                "target": torch.full((batch_size, 1), PAD, dtype=torch.int64),
                "target_lengths": torch.zeros(batch_size, dtype=torch.int64), "text": [""] * batch_size}
