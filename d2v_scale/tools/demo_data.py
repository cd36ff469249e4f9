"""Small real datasets made on the machine, for the demo and the tests (nothing is downloaded).

* images: procedurally drawn scenes (textured backgrounds, 1-3 coloured shapes of the class's kind),
  ImageNet folder layout;
* text: English prose already on every machine: the license texts Debian ships, package copyright
  files, and the docstrings of Python's standard library;
* speech: sentences of that text spoken by espeak-ng (several voices, speeds and pitches); without
  espeak-ng, voiced synthetic utterances (glottal pulse trains through moving formant resonators).
"""
from __future__ import annotations

import ast
import math
import random
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchaudio.functional import lfilter

SHAPES = ("circle", "square", "triangle", "star")


# -- images ----------------------------------------------------------------------------------------

def _shape_colour(rng: random.Random, background: tuple[np.ndarray, np.ndarray]) -> tuple[int, int, int]:
    """A colour that stands out from both colours of the background (sum of channel differences >= 160)."""
    for _ in range(50):
        color = tuple(rng.randrange(256) for _ in range(3))
        if all(np.abs(np.array(color, dtype=np.float32) - c).sum() >= 160 for c in background):
            break
    return color


def draw_scene(rng: random.Random, size: int, shapes: tuple[int, int] = (1, 3)) -> tuple[Image.Image, int]:
    """A textured background with `shapes` (1-3) shapes of one kind, the class, each in its own colour
    that stands out from the background; their bounding boxes do not overlap, so no shape covers
    another and the class is in every picture (a shape that finds no free place is left out, never
    the first). Returns (image, class)."""
    c0 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    fx, fy, ph = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6.28)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = 0.5 + 0.5 * np.sin(6.28 * (fx * xx + fy * yy) + ph)                      # (size, size)
    im = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    label = rng.randrange(len(SHAPES))
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.randint(*shapes)):
        for _ in range(30):
            r = rng.uniform(0.12, 0.25) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(abs(cx - x) > r + q or abs(cy - y) > r + q for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        color = _shape_colour(rng, (c0, c1))
        if SHAPES[label] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif SHAPES[label] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            n = 3 if SHAPES[label] == "triangle" else 10
            a0 = rng.uniform(0, 6.28)
            radius = [r if (i % 2 == 0 or n == 3) else r / 2.5 for i in range(n)]
            draw.polygon([(cx + radius[i] * math.cos(a0 + 6.28 * i / n), cy + radius[i] * math.sin(a0 + 6.28 * i / n))
                          for i in range(n)], fill=color)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return im, label


def make_images(out: Path, n: int, size: int = 48, seed: int = 0, shapes: tuple[int, int] = (1, 3)) -> Path:
    """`n` scenes as PNG in class subfolders (the ImageNet train layout)."""
    out = Path(out)
    rng = random.Random(seed)
    for k in SHAPES:
        (out / k).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im, label = draw_scene(rng, size, shapes)
        im.save(out / SHAPES[label] / f"scene_{i:06d}.png")
    return out


# -- text ------------------------------------------------------------------------------------------

def _stdlib_docstrings(limit_files: int = 400) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py"))[:limit_files]:
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return docs


def make_corpus(out: Path, max_bytes: int = 3_000_000) -> Path:
    """Text files of real English prose found on this machine, one document per file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    total, n = 0, 0
    for src in sources:
        if not src.is_file() or total > max_bytes:
            continue
        text = src.read_text(errors="replace")
        if len(text) > 500:
            (out / f"doc_{n:05d}.txt").write_text(text)
            total, n = total + len(text), n + 1
    for i, doc in enumerate(_stdlib_docstrings()):
        if total > max_bytes:
            break
        (out / f"pydoc_{i:05d}.txt").write_text(doc + "\n")
        total += len(doc)
    return out


def sentences(corpus: Path, n: int, seed: int = 0) -> list[str]:
    """n plain sentences of 6-25 words from the corpus."""
    found = []
    for f in sorted(Path(corpus).glob("*.txt")):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(f.read_text(errors="replace").split())):
            words = s.split()
            if 6 <= len(words) <= 25 and re.fullmatch(r"[A-Za-z ,.;'!?()-]+", s):
                found.append(s)
    random.Random(seed).shuffle(found)
    return found[:n]


# -- speech ----------------------------------------------------------------------------------------

def espeak() -> str | None:
    return shutil.which("espeak-ng") or shutil.which("espeak")


def _synthetic_utterance(rng: random.Random, sr: int = 16000) -> np.ndarray:
    """A voiced, speech-like signal: pulse train at a moving pitch through moving formant filters."""
    dur = rng.uniform(2.0, 5.0)
    n = int(dur * sr)
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(np.linspace(0, rng.uniform(2, 8), n)))
    phase = np.cumsum(f0 / sr)
    src = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    out = np.zeros(n)
    seg = int(0.15 * sr)
    for start in range(0, n, seg):
        s = src[start:start + seg]
        for f, bw in ((rng.uniform(300, 900), 80), (rng.uniform(900, 2500), 120), (rng.uniform(2500, 3500), 200)):
            r = math.exp(-math.pi * bw / sr)
            a = torch.tensor([1, -2 * r * math.cos(2 * math.pi * f / sr), r * r], dtype=torch.float64)
            b = torch.tensor([1 - r, 0.0, 0.0], dtype=torch.float64)
            out[start:start + len(s)] += lfilter(torch.from_numpy(s), a, b, clamp=False).numpy()
    env = 0.5 + 0.5 * np.sin(np.linspace(0, rng.uniform(6, 20), n)) ** 2
    out = out * env + 0.003 * np.random.default_rng(rng.randrange(1 << 30)).standard_normal(n)
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def make_speech(out: Path, n: int, corpus: Path | None = None, seed: int = 0) -> Path:
    """`n` utterances as wav under speaker folders: espeak-ng speech when available, else synthetic."""
    out = Path(out)
    rng = random.Random(seed)
    tts = espeak()
    lines = sentences(corpus, n, seed) if (tts and corpus) else []
    voices = ["en-us", "en", "en-gb-x-rp", "en-us+f3", "en+m3", "en+f2"]
    for i in range(n):
        spk = out / f"speaker{i % 6}"
        spk.mkdir(parents=True, exist_ok=True)
        path = spk / f"utt_{i:05d}.wav"
        if tts and i < len(lines):
            cmd = [tts, "-v", voices[i % len(voices)], "-s", str(rng.randint(130, 190)), "-p", str(rng.randint(25, 75)),
                   "-w", str(path), lines[i]]
            if subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0:
                continue
        sf.write(path, _synthetic_utterance(rng), 16000)
    return out
