"""Transcripts for audio sources (`d2v-shard audio ... --transcripts beside|manifest|FILE.tsv`).

* beside: `name.wrd` (or `name.txt`) next to each audio file `name.wav`, the words of the utterance;
* manifest: SRC is a wav2vec manifest `split.tsv`; `split.wrd` (or `split.ltr`) beside it holds one
  line per manifest entry, as fairseq's `examples/wav2vec/libri_labels.py` writes them (`.ltr`
  letters with `|` between words are turned back into words);
* FILE.tsv: a header line naming the columns, then one row per file; `columns` says which column
  holds the path (relative to SRC, as a manifest lists it) and which the transcript.
Transcripts are stored single-spaced (`txt`); `dict.ltr.txt` (fairseq's letter dictionary, `|` for
the word boundary) is built from them and written beside the shards.
"""
from __future__ import annotations

from pathlib import Path

from d2v_scale.data.letters import letters_to_text, normalize

FIX = "give --transcripts beside (name.wrd or name.txt next to each audio file), manifest (SRC.tsv with SRC.wrd/.ltr " \
      "beside it) or FILE.tsv (a header line naming the path and transcript columns)"


def _beside(root: Path, files: list[str]) -> dict[str, str]:
    found = {}
    for rel in files:
        audio = root / rel
        for ext in (".wrd", ".txt"):
            text = audio.with_suffix(ext)
            if text.is_file():
                found[rel] = text.read_text(encoding="utf-8")
                break
    return found


def _manifest(src: Path, files: list[str]) -> dict[str, str]:
    if src.suffix != ".tsv":
        raise ValueError(f"--transcripts manifest: SRC {src} is not a .tsv manifest; {FIX}")
    for ext, convert in ((".wrd", normalize), (".ltr", lambda line: letters_to_text(line.split()))):
        labels = src.with_suffix(ext)
        if labels.is_file():
            lines = labels.read_text(encoding="utf-8").splitlines()
            if len(lines) != len(files):
                raise ValueError(f"--transcripts manifest: {labels} has {len(lines)} lines for the {len(files)} files of "
                                 f"{src}; write it with libri_labels.py from the same manifest")
            return {rel: convert(line) for rel, line in zip(files, lines)}
    raise ValueError(f"--transcripts manifest: neither {src.with_suffix('.wrd')} nor {src.with_suffix('.ltr')} "
                     f"exists; {FIX}")


def _table(path: Path, columns: tuple[str, str]) -> dict[str, str]:
    if not path.is_file():
        raise ValueError(f"--transcripts {path}: not a file; {FIX}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = lines[0].split("\t") if lines else []
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"--transcripts {path}: no column {missing[0]!r} in its header ({', '.join(header) or 'empty'}); "
                         f"start the file with a header line naming the columns, or name them with "
                         f"--transcript_columns PATH_COLUMN,TEXT_COLUMN")
    at, tt = header.index(columns[0]), header.index(columns[1])
    out = {}
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) <= max(at, tt):
            raise ValueError(f"--transcripts {path}:{n}: {len(parts)} columns, the header names {len(header)}")
        out[parts[at].strip()] = parts[tt]
    return out


def read_transcripts(spec: str, src: str, root: str, files: list[str],
                     columns: tuple[str, str] = ("path", "transcript")) -> dict[str, str]:
    """{relative path: single-spaced transcript} for every file; ValueError (with the fix) if one lacks one."""
    if spec == "beside":
        found = _beside(Path(root), files)
    elif spec == "manifest":
        found = _manifest(Path(src), files)
    else:
        found = _table(Path(spec), columns)
    missing = [f for f in files if f not in found]
    if missing:
        raise ValueError(f"--transcripts {spec}: {len(missing)} of {len(files)} audio files have no transcript (first: "
                         f"{missing[0]}); {FIX}, or remove the files without one from SRC")
    return {f: normalize(found[f]) for f in files}
