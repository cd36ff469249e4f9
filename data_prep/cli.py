"""d2v-shard: turn image folders, audio collections and text corpora into WebDataset shards.

  d2v-shard image SRC DST [--max_size PX] [--labels auto|none] [--max_pixels 64000000]
                                                       image folder or ImageNet train layout
  d2v-shard audio SRC DST [--ext wav,flac,ogg] [--max_seconds 30] [--min_seconds 1]   folder or .tsv
  d2v-shard manifest SRC DEST [--valid_percent 0.01]   wav2vec-style train.tsv / valid.tsv [--overwrite]
  d2v-shard spm-train CORPUS MODEL_PREFIX --vocab_size N [--overwrite]
  d2v-shard text SRC DST --spm MODEL [--tokens_per_sample 512]
  d2v-shard glue FILE.tsv DST --spm MODEL (--task rte | --sentence1 COL [--sentence2 COL] --label COL)
                                                       [--regression] [--label_names a,b] [--max_positions 512]
                                                       [--skip_bad_rows]   rows of another field count
  audio and text: [--labels FILE.tsv|folders]          class labels (`cls`, classes.json) for probes
  audio: [--transcripts beside|manifest|FILE.tsv]      transcripts (`txt`, dict.ltr.txt) for CTC fine-tuning
  d2v-shard verify INDEX                               re-read, decode and checksum every shard

DST is a local pattern (`out/train-%06d.tar`), a local directory (-> `shard-%06d.tar`), or
`s3://bucket/prefix/name-%06d.tar` (credentials and endpoint from the standard AWS environment).
Common options: --maxcount (samples per shard), --maxsize (bytes per shard), --workers (processes),
--seed (input order shuffle; same input + seed -> identical shards), --overwrite (replace the shards
of the same pattern and the index already at DST; without it such a DST is refused). The index JSON
(shard URLs, samples, bytes, sha256) is written last, beside the shards.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import fire
import sentencepiece as spmlib

from d2v_scale.data.image import MAX_IMAGE_PIXELS
from d2v_scale.data.letters import DICT_FILE, LetterDict
from d2v_scale import helptext
from d2v_scale.errors import D2VError, argument_with_url_credentials, url_credentials_refusal
from d2v_scale.outputs import OutputError, check_output

from .audio import encode_audio, find_audio, write_manifest
from .glue import encode_rows, label_values, layout_for, make_sample, read_rows, task_metric
from .image import encode_image, find_images
from .labels import classes_json, read_labels
from .pipeline import Chunks, shard
from .sink import normalize_pattern
from .text import BlockPacker, DocumentBlocks, encode_text_file, find_text, train_spm
from .transcripts import read_transcripts
from .verify import verify as run_verify

WORKERS = os.cpu_count() or 1


def _fail(msg: str):
    raise SystemExit(f"d2v-shard: error: {msg}")


def _summary(index: dict, what: str) -> None:
    extra = ""
    if index.get("dropped_too_short"):
        extra += f"; dropped {index['dropped_too_short']} chunks shorter than --min_seconds"
    if index.get("upload_mb_per_s"):
        extra += f"; upload {index['upload_mb_per_s']:.1f} MB/s"
    print(f"wrote {index['samples']} {what} in {len(index['shards'])} shards ({index['bytes'] / 1e6:.1f} MB); "
          f"skipped {index.get('skipped_inputs', 0)} of {index.get('inputs', '?')} inputs"
          + (f" (listed in {index['skipped_report']})" if index.get("skipped_report") else "") + extra)
    for err in index.get("errors", [])[:3]:
        print(f"d2v-shard: skipped {err['input']}: {err['error']}", file=sys.stderr)


def _at_least(lo: float, **values) -> None:
    """Refuse a numeric option below `lo` (or not a number) with its name."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lo:
            _fail(f"--{name} {value!r}: must be a number >= {lo:g}")


def _run(items, fn, dst, keys, what, meta, maxcount, maxsize, workers, seed, collector=None, extras=None,
         overwrite=False):
    _at_least(1, maxcount=maxcount, maxsize=maxsize, workers=workers)
    try:
        index = shard(items, fn, normalize_pattern(dst), keys=keys, maxcount=maxcount, maxsize=maxsize,
                      workers=workers, seed=seed, desc=what, meta=meta, collector=collector, extras=extras,
                      overwrite=overwrite)
    except (D2VError, ValueError) as e:
        _fail(str(e))
    _summary(index, what)
    return index


def _source(src: str) -> Path:
    p = Path(src)
    if not p.exists():
        _fail(f"{src} does not exist")
    return p


def image(src: str, dst: str, maxcount: int = 10_000, maxsize: float = 1e9, workers: int = WORKERS,
          max_size: int | None = None, seed: int = 0, overwrite: bool = False, labels: str = "auto",
          max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Shard an image folder, or an ImageNet train layout (class subfolders -> `cls` + classes.json).

      SRC                    a folder of images (.jpg .jpeg .png .webp .bmp), class subfolders for labels
      DST                    out/train-%06d.tar, a folder, or s3://bucket/prefix/name-%06d.tar
      --labels auto|none     class subfolders give labels (none: no labels)
      --max_size PX          shrink images whose longer side is above PX
      --max_pixels N         skip images above N pixels (width x height) without decoding them
      --maxcount N --maxsize BYTES   samples and bytes per shard
      --workers N --seed 0   encoding processes; input order shuffle (same input + seed: same shards)
      --overwrite            replace the shards and index of the same pattern already at DST"""
    root = _source(src)
    if not root.is_dir():
        _fail(f"{src} is not a directory of images")
    _at_least(1, max_pixels=max_pixels, **({"max_size": max_size} if max_size is not None else {}))
    try:
        files, classes = find_images(src, str(labels))
    except ValueError as e:
        _fail(str(e))
    if not files:
        _fail(f"{src} contains no images (.jpg, .jpeg, .png, .webp, .bmp)")
    extras = {"classes.json": (json.dumps({c: i for i, c in enumerate(classes)}, indent=1) + "\n").encode()} \
        if classes else None
    _run([(src, rel, label, max_size, int(max_pixels)) for rel, label in files], encode_image, dst,
         [rel for rel, _ in files], "images",
         {"modality": "image", "classes": len(classes or []), "max_pixels": int(max_pixels)}, maxcount, maxsize,
         workers, seed, extras=extras, overwrite=overwrite)


def _labels(spec: str | None, files: list[str]) -> tuple[dict[str, int] | None, list[str]]:
    if not spec:
        return None, []
    try:
        return read_labels(str(spec), files)
    except ValueError as e:
        _fail(str(e))


def audio(src: str, dst: str, ext: str = "wav,flac,ogg", max_seconds: float = 30.0, min_seconds: float = 1.0,
          maxcount: int = 2_000, maxsize: float = 1e9, workers: int = WORKERS, seed: int = 0,
          overwrite: bool = False, labels: str | None = None, transcripts: str | None = None,
          transcript_columns: str = "path,transcript") -> None:
    """Shard audio (a folder of wav/flac/ogg, recursive, or a .tsv manifest) as mono 16 kHz flac chunks.

      SRC                    the folder or manifest
      DST                    out/train-%06d.tar, a folder, or s3://bucket/prefix/name-%06d.tar
      --max_seconds 30 --min_seconds 1   chunk length; shorter tails are dropped
      --ext wav,flac,ogg     the file types to take
      --labels FILE.tsv|folders   every chunk carries its file's class (`cls`, classes.json)
      --transcripts beside|manifest|FILE.tsv   one sample per file with its transcript (`txt`) and
                             the letter dictionary beside the shards (dict.ltr.txt), for CTC fine-tuning
      --transcript_columns path,transcript   the columns of a transcript table
      --maxcount N --maxsize BYTES   samples and bytes per shard
      --workers N --seed 0   encoding processes; input order shuffle (same input + seed: same shards)
      --overwrite            replace the shards and index of the same pattern already at DST"""
    _source(src)
    exts = tuple(ext.split(",")) if isinstance(ext, str) else tuple(ext)
    root, files = find_audio(src, exts)
    if not files:
        _fail(f"{src} has no audio files ({', '.join(exts)})")
    if max_seconds < min_seconds:
        _fail(f"--max_seconds {max_seconds} < --min_seconds {min_seconds}")
    label_of, classes = _labels(labels, files)
    text_of, extras = {}, {"classes.json": classes_json(classes)} if classes else {}
    if transcripts:
        columns = tuple(transcript_columns.split(",")) if isinstance(transcript_columns, str) else tuple(transcript_columns)
        if len(columns) != 2:
            _fail(f"--transcript_columns {transcript_columns!r}: two column names, PATH_COLUMN,TEXT_COLUMN")
        try:
            text_of = read_transcripts(str(transcripts), src, root, files, columns)
            extras[DICT_FILE] = LetterDict.build(text_of.values()).text().encode("utf-8")
        except (ValueError, D2VError) as e:
            _fail(str(e))
    _run([(root, rel, max_seconds, min_seconds, label_of[rel] if label_of else None, text_of.get(rel))
          for rel in files],
         encode_audio, dst, files, "audio chunks",
         {"modality": "audio", "sample_rate": 16000, "max_seconds": max_seconds, "classes": len(classes),
          **({"transcripts": len(text_of)} if text_of else {})},
         maxcount, maxsize, workers, seed, collector=Chunks(), overwrite=overwrite, extras=extras or None)


def _outputs(paths: list[Path], overwrite: bool) -> None:
    """Files written under a name the user gave: refused if they exist (without --overwrite) or lie
    inside a run's checkpoints."""
    for p in paths:
        try:
            check_output(p, overwrite)
        except OutputError as e:
            _fail(str(e))


def manifest(src: str, dest: str, valid_percent: float = 0.01, ext: str = "flac", seed: int = 42,
             overwrite: bool = False) -> None:
    """Write train.tsv / valid.tsv (root line, then path<TAB>frames) as fairseq's wav2vec_manifest does.

      SRC                    a folder of audio files (recursive)
      DEST                   the folder to write the two manifests into
      --valid_percent 0.01   the share of files in valid.tsv
      --ext flac --seed 42   file types; the split's seed
      --overwrite            replace existing manifests"""
    _source(src)
    _outputs([Path(dest) / "train.tsv", Path(dest) / "valid.tsv"], overwrite)
    try:
        counts = write_manifest(src, dest, valid_percent, tuple(ext.split(",")), seed)
    except ValueError as e:
        _fail(str(e))
    print(f"wrote {dest}/train.tsv ({counts['train']} files) and {dest}/valid.tsv ({counts['valid']}); "
          f"{len(counts['unreadable'])} unreadable files skipped")


def spm_train(corpus: str, model_prefix: str, vocab_size: int = 8000, model_type: str = "unigram",
              seed: int = 0, overwrite: bool = False) -> None:
    """Train a sentencepiece model with fairseq's special-token layout (bos 0, pad 1, eos 2, unk 3).

      CORPUS                 a text file or a folder of them
      MODEL_PREFIX           writes MODEL_PREFIX.model and .vocab
      --vocab_size 8000 --model_type unigram   the vocabulary
      --overwrite            replace an existing model"""
    _source(corpus)
    _outputs([Path(model_prefix + ".model"), Path(model_prefix + ".vocab")], overwrite)
    try:
        path = train_spm(corpus, model_prefix, vocab_size, model_type, seed=seed)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    print(f"wrote {path} ({vocab_size} pieces)")


def text(src: str, dst: str, spm: str, tokens_per_sample: int = 512, maxcount: int = 10_000,
         maxsize: float = 1e9, workers: int = WORKERS, seed: int = 0, overwrite: bool = False,
         labels: str | None = None) -> None:
    """Shard text files as blocks of <s> + (tokens_per_sample - 1) sentencepiece ids (.npy).

      SRC                    a text file or a folder of them
      DST                    out/train-%06d.tar, a folder, or s3://bucket/prefix/name-%06d.tar
      --spm MODEL            the sentencepiece model (`d2v-shard spm-train`)
      --tokens_per_sample 512   block length
      --labels FILE.tsv|folders   each file one document of one class: its blocks stay its own, the
                             last padded with <pad>, every block carries the class
      --maxcount N --maxsize BYTES   samples and bytes per shard
      --workers N --seed 0   encoding processes; input order shuffle (same input + seed: same shards)
      --overwrite            replace the shards and index of the same pattern already at DST"""
    _source(src)
    if not Path(spm).exists():
        _fail(f"--spm {spm} not found; train one with `d2v-shard spm-train CORPUS PREFIX --vocab_size N`")
    files = find_text(src)
    if not files:
        _fail(f"{src} has no text files")

    vocab = spmlib.SentencePieceProcessor(model_file=spm).get_piece_size()
    root = Path(src) if Path(src).is_dir() else Path(src).parent
    label_of, classes = _labels(labels, [str(Path(f).relative_to(root)) for f in files])
    if label_of:
        docs = DocumentBlocks(tokens_per_sample, vocab, {f: label_of[str(Path(f).relative_to(root))] for f in files})
        _run([(f, spm) for f in files], encode_text_file, dst, files, "text blocks",
             {"modality": "text", "spm": str(Path(spm).resolve()), "vocab_size": vocab, "classes": len(classes)},
             maxcount, maxsize, workers, seed, collector=docs,
             extras={"classes.json": classes_json(classes)}, overwrite=overwrite)
        return

    class Packer:
        def __init__(self):
            self.p = BlockPacker(tokens_per_sample, vocab)

        def feed(self, ids, key):
            return list(self.p.feed(ids, key))

        def finish(self):
            return self.p.finish()

        def stats(self):
            return {"tokens_per_sample": tokens_per_sample, "tail_tokens_dropped": self.p.tail_dropped}

    _run([(f, spm) for f in files], encode_text_file, dst, files, "text blocks",
         {"modality": "text", "spm": str(Path(spm).resolve()), "vocab_size": vocab}, maxcount, maxsize,
         workers, seed, collector=Packer(), overwrite=overwrite)


def verify(index: str, decode: bool = True) -> None:
    """Re-read every shard of an index: existence, size, sha256, sample count, decodability.

      INDEX                  the index.json that d2v-shard wrote (local or s3://)
      --decode true|false    also decode every sample (default true)"""
    try:
        report = run_verify(index, decode)
    except (OSError, D2VError, ValueError, KeyError) as e:
        _fail(f"{index}: {e}")
    for url, problems in report["problems"].items():
        for p in problems:
            print(f"PROBLEM {url}: {p}")
    status = "ok" if not report["problems"] else f"{len(report['problems'])} shards with problems"
    print(f"{status}: {report['shards']} shards, {report['samples']} samples")
    if report["problems"]:
        raise SystemExit(1)


def glue(src: str, dst: str, spm: str, task: str | None = None, sentence1=None, sentence2=None, label=None,
         header: bool | None = None, regression: bool = False, label_names=None, max_positions: int = 512,
         maxcount: int = 10_000, maxsize: float = 1e9, seed: int = 0, overwrite: bool = False,
         skip_bad_rows: bool | None = None) -> None:
    """Shard a GLUE-format TSV for `d2v finetune --task text_classification` (a class or target per row).

    Each row becomes `<s> a </s>[</s> b </s>]` sentencepiece ids with its class (`cls`, classes.json)
    or regression target. Rows must have the header's field count (a tab inside a field would shift
    the label).

      SRC                    the TSV (e.g. GLUE's RTE/train.tsv)
      DST                    out/train-%06d.tar, a folder, or s3://bucket/prefix/name-%06d.tar
      --spm MODEL            the sentencepiece model of the pretraining shards
      --task NAME            a GLUE task's columns: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte
      --sentence1 COL [--sentence2 COL] --label COL   or the columns by header name
                             (0-based positions with --header false)
      --regression           the label is a number (STS-B); --label_names a,b fixes the class order
      --max_positions 512    longer rows are cut (and counted)
      --skip_bad_rows        leave out rows of another field count (the default for qqp, as fairseq does)
      --maxcount N --seed 0 --overwrite   as for the other commands"""
    path = _source(src)
    if not path.is_file():
        _fail(f"{src} is not a file: give one TSV (e.g. GLUE's RTE/train.tsv)")
    if not Path(spm).exists():
        _fail(f"--spm {spm} not found: give the sentencepiece model of the pretraining shards (their index.json "
              "records it as 'spm')")
    try:
        layout = layout_for(task, sentence1, sentence2, label, header, regression, label_names, skip_bad_rows)
        rows = read_rows(src, layout)
        values, names = label_values(rows, layout, src)
        ids, cut = encode_rows(rows, spm, max_positions)
    except ValueError as e:
        _fail(str(e))
    if rows.left_out:
        print(f"d2v-shard: {src}: left out {len(rows.left_out)} rows whose field count is not the header's (lines "
              f"{', '.join(map(str, rows.left_out[:10]))}{' ...' if len(rows.left_out) > 10 else ''})", file=sys.stderr)
    vocab = spmlib.SentencePieceProcessor(model_file=spm).get_piece_size()
    is_regression = names is None
    counts = [values.count(i) for i in range(len(names))] if names else []
    meta = {"modality": "text", "spm": str(Path(spm).resolve()), "vocab_size": vocab, "classes": len(names or []),
            "glue": {"task": (task or "").lower().replace("-", "").replace("_", ""), "regression": is_regression,
                     "labels": names, "label_counts": counts, "metric": task_metric(layout.metric, names),
                     "pairs": layout.sentence2 is not None, "max_positions": max_positions,
                     "longest": max(len(x) for x in ids), "truncated": cut, "rows_left_out": len(rows.left_out)}}
    _run([(x, y, is_regression, f"{path.name}:{n}", vocab) for x, y, n in zip(ids, values, rows.lines)], make_sample,
         dst, [f"{path.name}:{n}" for n in rows.lines], "sentences", meta, maxcount, maxsize, 1, seed,
         extras={"classes.json": classes_json(names)} if names else None, overwrite=overwrite)
    if cut:
        print(f"d2v-shard: {cut} rows were cut to --max_positions {max_positions} tokens", file=sys.stderr)


COMMANDS = {"image": image, "audio": audio, "manifest": manifest, "spm-train": spm_train, "spm_train": spm_train,
            "text": text, "glue": glue, "verify": verify}


WHAT = "Turn image folders, audio collections, text corpora and GLUE tables into WebDataset shards."
ALIASES = {"spm_train": "spm-train"}                 # accepted, listed once


def _terminate(signum, frame):
    raise SystemExit(128 + signum)      # unwinds like Ctrl-C: the open shard is removed, no index is written


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    argv = list(argv if argv is not None else sys.argv[1:])
    secret = argument_with_url_credentials(argv)
    if secret:
        _fail(url_credentials_refusal(secret))
    if not argv or argv[0] in helptext.HELP_FLAGS or argv[0] == "help":
        name = argv[1] if len(argv) > 1 and argv[0] == "help" and argv[1] in COMMANDS else None
        print(helptext.command_help("d2v-shard", ALIASES.get(name, name), COMMANDS[name]) if name else
              helptext.overview("d2v-shard", WHAT, COMMANDS, ALIASES), end="")
        return
    if argv[0] not in COMMANDS:
        _fail(f"unknown command {argv[0]!r}: one of {', '.join(k for k in COMMANDS if k not in ALIASES)} "
              "(`d2v-shard --help` says what each does)")
    if helptext.wants_help(argv):
        print(helptext.command_help("d2v-shard", ALIASES.get(argv[0], argv[0]), COMMANDS[argv[0]]), end="")
        return
    try:
        fire.Fire(COMMANDS, command=argv, name="d2v-shard")
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        _fail(f"cannot use{where}: {e.strerror or e}; check the path and its permissions")


if __name__ == "__main__":
    main()
