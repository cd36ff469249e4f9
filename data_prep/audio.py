"""Audio sources: a folder of wav/flac/ogg (recursive) or a wav2vec-style .tsv manifest.

Every file is read with soundfile, mixed down to mono, resampled to 16 kHz with
`torchaudio.functional.resample`, split into chunks of at most `max_seconds` (equal lengths, so no
tiny tail), and each chunk stored as 16-bit flac. Chunks shorter than `min_seconds` are dropped and
counted. A file with a transcript is one sample (its transcript cannot be split): longer than
`max_seconds` it raises, like a file soundfile cannot read (corrupt, not audio); the driver skips
and reports both.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from d2v_scale.data.format import AUDIO_EXT, CLASS_EXT, SAMPLE_RATE, SOURCE_EXT, TRANSCRIPT_EXT
from d2v_scale.outputs import atomic


def find_audio(src: str, exts: tuple[str, ...]) -> tuple[str, list[str]]:
    """(root, relative paths) from a folder (recursive) or a .tsv manifest (root line + path<TAB>n)."""
    p = Path(src)
    if p.is_file() and p.suffix == ".tsv":
        lines = p.read_text().splitlines()
        if not lines:
            return str(p.parent), []
        root = lines[0].strip()
        return root, [line.split("\t")[0] for line in lines[1:] if line.strip()]
    suffixes = {f".{e.lower().lstrip('.')}" for e in exts}
    files = sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
    return str(p), files


def load_mono_16k(path: str | Path) -> np.ndarray:
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for non-audio input
        raise ValueError(f"not readable audio: {e}") from None
    wav = wav.mean(axis=1)                                               # (n,) mono
    if sr != SAMPLE_RATE:
        wav = AF.resample(torch.from_numpy(wav), sr, SAMPLE_RATE).numpy()
    return wav


def encode_audio(root: str, rel: str, max_seconds: float, min_seconds: float,
                 label: int | None = None, transcript: str | None = None) -> tuple[list[dict], int]:
    """(flac chunk samples, number of chunks dropped as too short); every chunk carries `label`;
    with a `transcript` the file is one sample carrying it."""
    wav = load_mono_16k(Path(root) / rel)
    max_len, min_len = int(max_seconds * SAMPLE_RATE), int(min_seconds * SAMPLE_RATE)
    if transcript is not None and len(wav) > max_len:
        raise ValueError(f"{len(wav) / SAMPLE_RATE:.1f} s with a transcript is longer than --max_seconds "
                         f"{max_seconds}; a transcript cannot be split with the audio: raise --max_seconds")
    n_chunks = max(1, math.ceil(len(wav) / max_len))
    size = math.ceil(len(wav) / n_chunks)
    samples, dropped = [], 0
    for i in range(n_chunks):
        chunk = wav[i * size:(i + 1) * size]
        if len(chunk) < min_len:
            dropped += 1
            continue
        buf = io.BytesIO()
        sf.write(buf, np.clip(chunk, -1, 1), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        sample = {AUDIO_EXT: buf.getvalue(), SOURCE_EXT: f"{rel}#{i}"}
        if label is not None:
            sample[CLASS_EXT] = str(label)
        if transcript is not None:
            sample[TRANSCRIPT_EXT] = transcript
        samples.append(sample)
    return samples, dropped


def write_manifest(src: str, dest: str, valid_percent: float, exts: tuple[str, ...], seed: int) -> dict:
    """train.tsv / valid.tsv in wav2vec_manifest's format: root line, then path<TAB>frames."""
    root, files = find_audio(src, exts)
    if not files:
        raise ValueError(f"{src}: no audio files with extensions {', '.join(exts)}")
    rng = random.Random(seed)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "valid": 0, "unreadable": []}
    root_abs = str(Path(root).resolve())
    with atomic(out / "train.tsv") as train_tmp, atomic(out / "valid.tsv") as valid_tmp, \
            open(train_tmp, "w") as train, open(valid_tmp, "w") as valid:     # renamed when complete
        print(root_abs, file=train)
        print(root_abs, file=valid)
        for rel in files:
            try:
                frames = sf.info(str(Path(root) / rel)).frames
            except Exception as e:  # noqa: BLE001
                counts["unreadable"].append(f"{rel}: {e}")
                continue
            split = "valid" if rng.random() < valid_percent else "train"
            print(f"{rel}\t{frames}", file=valid if split == "valid" else train)
            counts[split] += 1
    return counts
