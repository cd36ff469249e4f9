"""Transcribed audio shards (CTC fine-tuning): the check that samples carry a transcript (`txt`),
every transcript of a shard set (read from the tar members only, the audio left unread where the
shards are local), and the letter dictionary: `dict.ltr.txt` beside the training shards (d2v-shard
audio --transcripts writes it), or built from their transcripts when it is absent.
"""
from __future__ import annotations

import tarfile

import webdataset as wds

from .format import AUDIO_EXT, TRANSCRIPT_EXT
from .labels import first_sample, sample_modality
from .letters import DICT_FILE, LetterDict
from .s3 import S3Error, read_bytes, register
from .shards import DataError, Shards, is_local, local_path

NO_TRANSCRIPTS_FIX = ("make transcribed shards: `d2v-shard audio SRC DST --transcripts beside|manifest|FILE.tsv` "
                      "(name.wrd/.txt beside each file, fairseq's .wrd/.ltr beside a .tsv manifest, or a table)")


def check_transcripts(shards: Shards, source: str) -> None:
    """DataError unless the shards hold audio samples with transcripts."""
    made = shards.index.get("modality")
    if made and made != "audio":
        raise DataError(f"{source} holds {made} samples (its index says so); CTC fine-tuning needs transcribed audio: "
                        f"{NO_TRANSCRIPTS_FIX}")
    try:
        sample = first_sample(shards.urls[0]) or {}
    except (OSError, S3Error, ValueError, tarfile.TarError) as e:
        raise DataError(f"{source}: cannot read a sample of {shards.urls[0]} ({e})") from None
    held = sample_modality(sample)
    if held and held != "audio":
        raise DataError(f"{source} holds {held} samples; CTC fine-tuning needs transcribed audio: {NO_TRANSCRIPTS_FIX}")
    if AUDIO_EXT not in sample or TRANSCRIPT_EXT not in sample:
        raise DataError(f"{source}: the samples have no transcript (.{TRANSCRIPT_EXT}); {NO_TRANSCRIPTS_FIX}")


def shard_transcripts(shards: Shards) -> list[tuple[str, str]]:
    """[(where, transcript)] of every sample, in shard order."""
    out = []
    for url in shards.urls:
        if is_local(url):
            with tarfile.open(local_path(url)) as tf:
                for m in tf:
                    if m.isreg() and m.name.split(".", 1)[-1] == TRANSCRIPT_EXT:
                        out.append((f"{url}:{m.name.split('.', 1)[0]}", tf.extractfile(m).read().decode("utf-8")))
            continue
        register()
        for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
            if TRANSCRIPT_EXT in sample:
                out.append((f"{url}:{sample['__key__']}", sample[TRANSCRIPT_EXT].decode("utf-8")))
    return out


def letters_for(shards: Shards) -> tuple[LetterDict, str]:
    """The letter dictionary of the training shards and where it came from."""
    base = shards.urls[0].rsplit("/", 1)[0] if "/" in shards.urls[0] else "."
    try:
        data = read_bytes(f"{base}/{DICT_FILE}")
    except (FileNotFoundError, S3Error, OSError):
        data = None
    if data is not None:
        return LetterDict.parse(data.decode("utf-8"), f"{base}/{DICT_FILE}"), f"{base}/{DICT_FILE}"
    return LetterDict.build(t for _, t in shard_transcripts(shards)), "the training transcripts"


def check_letters(shards: Shards, letters: LetterDict, source: str) -> None:
    """DataError naming the first transcript with characters outside `letters` (the fix included)."""
    for where, text in shard_transcripts(shards):
        if letters.missing(text):
            letters.encode(text, f"{source}: {where}")
