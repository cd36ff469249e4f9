"""`d2v transcribe`: a CTC model fine-tuned by `d2v finetune --task audio_ctc` (its best.safetensors or
run directory) -> one line `name<TAB>transcript` per utterance of --audio: audio files, folders of
them, or shards (a .tar, an index.json or a folder of .tar). Greedy decoding, or beam search when
--lm.lexicon / --lm.kenlm are given (`--decoder greedy|beam` forces one). References known (the
shards' transcripts, a `.wrd`/`.txt` beside an audio file) give a closing WER/CER line.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
import webdataset as wds

from .checkpoint import consolidated_state
from .config import Config, ConfigError, from_dict
from .data import find_shards, register
from .data.format import AUDIO_EXT, SAMPLE_RATE, TRANSCRIPT_EXT
from .data.letters import DICT_FILE, LetterDict, normalize
from .errors import D2VError, one_line
from .evaluate.ctc_decode import BeamDecoder, error_rates, greedy_decode
from .export import read_info, read_weights
from .models import build_encoder
from .models.ctc import CTCModel

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def load_ctc(init: str | Path, tag: str | None = None) -> tuple[CTCModel, LetterDict, Config]:
    """A fine-tuned CTC model in eval mode, its letter dictionary and its config (`tag`: a run
    directory's checkpoint, default the newest)."""
    path = Path(init)
    if path.is_dir():
        state, _ = consolidated_state(path, tag, quiet=True)
        cfg_dict = _config_dict(path / "config.json")
        dict_path = path / DICT_FILE
        if not dict_path.is_file():
            raise ConfigError(f"--init {init} is not a CTC fine-tuning run (no {DICT_FILE} in it): give the run "
                              "directory or best.safetensors of `d2v finetune --task audio_ctc`")
        letters = LetterDict.load(dict_path)
    else:
        state, _, cfg_dict = read_weights(path)
        info = read_info(path)
        if "letters" not in info:
            raise ConfigError(f"--init {init} carries no letter dictionary: it is not a CTC model; give the "
                              "best.safetensors or run directory of `d2v finetune --task audio_ctc`")
        letters = LetterDict.parse(info["letters"], f"{init} (info)")
    if "mask_emb" not in state or "head.weight" not in state:
        raise ConfigError(f"--init {init} is not a CTC model (no mask_emb / head): give the best.safetensors or run "
                          "directory of `d2v finetune --task audio_ctc`")
    cfg = from_dict(cfg_dict)
    model = CTCModel(build_encoder(cfg.model), cfg.model.embed_dim, len(letters))
    model.load_state_dict(state)
    return model.eval(), letters, cfg


def _config_dict(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} not found: a fine-tuning run directory holds its config.json")
    return json.loads(path.read_text())


def _wave(data, normalize_wave: bool) -> torch.Tensor:
    wav, sr = sf.read(data, dtype="float32", always_2d=True)
    x = torch.from_numpy(wav.mean(axis=1))                                      # (S,)
    if sr != SAMPLE_RATE:
        x = AF.resample(x, sr, SAMPLE_RATE)
    return F.layer_norm(x, x.shape) if normalize_wave else x


def _reference(audio: Path) -> str | None:
    for ext in (".wrd", ".txt"):
        if audio.with_suffix(ext).is_file():
            return normalize(audio.with_suffix(ext).read_text(encoding="utf-8"))
    return None


class Skipped(list):
    """(input, why) of every input that could not be transcribed; each is reported as it is met."""

    def __init__(self, warn):
        super().__init__()
        self.warn = warn

    def add(self, name: str, why: str) -> None:
        self.append((name, why))
        self.warn(f"d2v transcribe: skipped {name}: {why}")


def _read(name: str, data, normalize_wave: bool, skipped: Skipped) -> torch.Tensor | None:
    """The waveform, or None (the input named in `skipped`) when it is not readable audio."""
    try:
        return _wave(data, normalize_wave)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as e:
        skipped.add(name, f"not readable audio ({one_line(e)[:160]}); give wav, flac or ogg files, folders of "
                          "them, or shards of `d2v-shard audio`")
        return None


def _source_kind(src: str) -> str | None:
    """'file' | 'folder' | 'shards', or None when the path does not exist."""
    p = Path(src)
    if p.is_dir():
        return "shards" if any(p.glob("*.tar")) or (p / "index.json").is_file() else "folder"
    if p.is_file():
        return "shards" if p.suffix.lower() in (".tar", ".json") else "file"
    return "shards" if "://" in src or any(c in src for c in "{*") else None


def _unusable(src: str) -> str | None:
    """Why a --audio input cannot be transcribed, told before the model loads (None: try it)."""
    kind = _source_kind(src)
    if kind is None:
        return "no such file or folder"
    if kind == "file":
        try:
            sf.info(src)
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            return (f"not readable audio ({one_line(e)[:160]}); give wav, flac or ogg files, folders of them, or "
                    "shards of `d2v-shard audio`")
    if kind == "folder" and not any(f.suffix.lower() in AUDIO_SUFFIXES for f in Path(src).rglob("*")):
        return f"a folder without audio files ({', '.join(AUDIO_SUFFIXES)}) or shards"
    return None


def utterances(sources: list[str], normalize_wave: bool, skipped: Skipped | None = None):
    """(name, (S,) waveform, reference or None) for every utterance of the sources, in order; an input
    that does not exist or is not audio is named in `skipped` and passed over."""
    skipped = skipped if skipped is not None else Skipped(lambda line: None)
    for src in sources:
        kind = _source_kind(src)
        if kind is None:
            skipped.add(src, "no such file or folder")
        elif kind == "file":
            wave = _read(src, src, normalize_wave, skipped)
            if wave is not None:
                yield src, wave, _reference(Path(src))
        elif kind == "folder":
            files = sorted(f for f in Path(src).rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                skipped.add(src, f"a folder without audio files ({', '.join(AUDIO_SUFFIXES)}) or shards")
            for f in files:
                wave = _read(str(f), str(f), normalize_wave, skipped)
                if wave is not None:
                    yield str(f), wave, _reference(f)
        else:
            register()
            try:
                shards = find_shards(src)
            except D2VError as e:
                skipped.add(src, one_line(e))
                continue
            def bad_shard(e: Exception) -> bool:
                skipped.add(src, f"a shard cannot be read ({one_line(e)[:160]})")
                return True
            for sample in wds.tarfile_to_samples(handler=bad_shard)(iter({"url": u} for u in shards.urls)):
                name = f"{sample['__url__']}:{sample['__key__']}"
                if AUDIO_EXT not in sample:
                    skipped.add(name, f"holds no .{AUDIO_EXT}; give audio shards (d2v-shard audio)")
                    continue
                wave = _read(name, io.BytesIO(sample[AUDIO_EXT]), normalize_wave, skipped)
                if wave is not None:
                    ref = sample.get(TRANSCRIPT_EXT)
                    yield name, wave, normalize(ref.decode("utf-8")) if ref is not None else None


def _batches(items, batch_size: int):
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


@torch.no_grad()
def transcribe(init: str, sources: list[str], lm, decoder: str = "auto", batch_size: int = 8,
               tag: str | None = None, out=print, warn=None) -> dict:
    """Print `name<TAB>transcript` per utterance; returns {"utterances", "decoder", "skipped": [(input, why)],
    and "wer"/"cer" when every utterance had a reference}. An input that is missing or not audio is named
    on stderr (`warn`) and the others are transcribed. lm: config.LMConfig."""
    if decoder not in ("auto", "greedy", "beam"):
        raise ConfigError(f"--decoder {decoder!r}: auto, greedy or beam")
    if not sources:
        raise ConfigError("d2v transcribe needs --audio FILES|FOLDER|SHARDS (comma-separated)")
    problems = [(src, why) for src in sources if (why := _unusable(src))]
    if len(problems) == len(sources):
        raise ConfigError("; ".join(f"--audio {src}: {why}" for src, why in problems[:3])
                          + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    model, letters, cfg = load_ctc(init, tag)
    use_beam = decoder == "beam" or (decoder == "auto" and bool(lm.lexicon or lm.kenlm))
    beam = BeamDecoder(letters, lm) if use_beam else None
    hyps, refs = [], []
    skipped = Skipped(warn or (lambda line: print(line, file=sys.stderr, flush=True)))
    for batch in _batches(utterances(sources, cfg.data.normalize, skipped), batch_size):
        sizes = [len(w) for _, w, _ in batch]
        source = torch.zeros(len(batch), max(sizes))                             # (B, S)
        pad = torch.ones(len(batch), max(sizes), dtype=torch.bool)               # (B, S) True = pad
        for i, (_, w, _) in enumerate(batch):
            source[i, : len(w)], pad[i, : len(w)] = w, False
        logits, frame_pad = model(source, pad)                                   # (B, T, V)
        lengths = CTCModel.frame_lengths(logits, frame_pad)
        texts = beam(logits, lengths) if beam is not None else greedy_decode(logits, lengths, letters)
        for (name, _, ref), text in zip(batch, texts):
            out(f"{name}\t{text}")
            hyps.append(text)
            refs.append(ref)
    result = {"utterances": len(hyps), "decoder": "beam" if beam is not None else "greedy", "skipped": list(skipped)}
    if hyps and all(r is not None for r in refs):
        result.update(error_rates(hyps, refs))
        out(f"{result['decoder']}: WER {result['wer']:.2f} CER {result['cer']:.2f} over {len(hyps)} utterances")
    return result
