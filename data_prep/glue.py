"""GLUE-format TSVs -> labelled sentence(-pair) samples for `d2v finetune --task text_classification`.

The rows' sentence columns are encoded with the pretraining run's sentencepiece model (fairseq's
Dictionary layout: <s> 0, <pad> 1, </s> 2, <unk> 3) and joined as fairseq's `sentence_prediction` task
does for RoBERTa and data2vec (init_token 0, separator_token 2): `<s> a </s>` or `<s> a </s></s> b </s>`,
cut to max_positions (fairseq TruncateDataset, `truncate_sequence`). Columns are named on the command
line or by a GLUE task's layout below (the files of the GLUE distribution, `examples/roberta/
preprocess_GLUE_tasks.sh`); CoLA's train/dev files have no header, so its columns are positions.
Classes are the sorted label names (or --label_names, or the task's), as classes.json beside.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from d2v_scale.data.format import CLASS_EXT, SOURCE_EXT, TARGET_EXT, TEXT_EXT

BOS, PAD, EOS = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    sentence1: str | int
    sentence2: str | int | None
    label: str | int
    header: bool = True
    labels: tuple[str, ...] | None = None     # None: regression
    metric: str = "accuracy"                  # fairseq best_checkpoint_metric of the data2vec yaml
    skip_bad_rows: bool = False               # leave out rows of another field count (else refuse the file)


# the GLUE distribution's train.tsv / dev.tsv columns (fairseq preprocess_GLUE_tasks.sh picks the same)
TASKS = {
    "cola": Layout(3, None, 1, header=False, labels=("0", "1"), metric="mcc"),
    "sst2": Layout("sentence", None, "label", labels=("0", "1")),
    "mrpc": Layout("#1 String", "#2 String", "Quality", labels=("0", "1"), metric="acc_and_f1"),
    "qqp": Layout("question1", "question2", "is_duplicate", labels=("0", "1"), metric="acc_and_f1",
                  skip_bad_rows=True),        # preprocess_GLUE_tasks.sh drops QQP's rows of another field count
    "stsb": Layout("sentence1", "sentence2", "score", labels=None, metric="pearson_and_spearman"),
    "mnli": Layout("sentence1", "sentence2", "gold_label", labels=("contradiction", "entailment", "neutral")),
    "qnli": Layout("question", "sentence", "label", labels=("entailment", "not_entailment")),
    "rte": Layout("sentence1", "sentence2", "label", labels=("entailment", "not_entailment")),
}


@dataclass
class Rows:
    """The rows of one TSV: texts, raw labels and their line numbers."""
    first: list[str]
    second: list[str] | None
    labels: list[str]
    lines: list[int]
    left_out: list[int]                        # line numbers of rows of another field count (skip_bad_rows)


def layout_for(task: str | None, sentence1, sentence2, label, header: bool | None, regression: bool,
               label_names, skip_bad_rows: bool | None = None) -> Layout:
    """The task's layout, with any column / label option given on the command line taking precedence."""
    if task:
        key = task.lower().replace("-", "").replace("_", "")
        if key not in TASKS:
            raise ValueError(f"--task {task}: not a GLUE task; one of {', '.join(TASKS)}, or name the columns with "
                             "--sentence1 COL [--sentence2 COL] --label COL")
        base = TASKS[key]
    elif sentence1 is None or label is None:
        raise ValueError("name the columns: --sentence1 COL [--sentence2 COL] --label COL (header names, or "
                         "0-based positions with --header false), or give a GLUE --task (" + ", ".join(TASKS) + ")")
    else:
        base = Layout(sentence1, sentence2, label, labels=())
    names = tuple(str(n) for n in (label_names.split(",") if isinstance(label_names, str) else label_names)) \
        if label_names else base.labels
    if regression or (task and base.labels is None):
        names = None
    return Layout(sentence1 if sentence1 is not None else base.sentence1,
                  sentence2 if sentence2 is not None else base.sentence2,
                  label if label is not None else base.label,
                  base.header if header is None else bool(header), names, base.metric,
                  base.skip_bad_rows if skip_bad_rows is None else bool(skip_bad_rows))


def read_rows(path: str, layout: Layout) -> Rows:
    """The named columns of every row. Tab-separated without quoting, as the GLUE files are written (csv
    QUOTE_NONE: MNLI's sentences hold bare `"`) and read (fairseq's `cut -f`, the GLUE loaders). Every row
    must have the header's field count (headerless files: the first row's): a tab inside a field would
    shift the label column, so such a file is refused with the line, or with `skip_bad_rows` (QQP's
    recipe, as fairseq's `awk NF==6`) those rows are left out and their lines returned."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path} is empty")
    header = lines[0].split("\t") if layout.header else []
    wanted = [("--sentence1", layout.sentence1), ("--label", layout.label)] + \
        ([("--sentence2", layout.sentence2)] if layout.sentence2 is not None else [])
    index = {}
    for option, col in wanted:
        if isinstance(col, int) or (isinstance(col, str) and col.isdigit() and not layout.header):
            index[option] = int(col)
        elif col in header:
            index[option] = header.index(col)
        elif layout.header:
            raise ValueError(f"{path} has no column {col!r} ({option}); its columns are: {', '.join(header)}; "
                             "name one of them, or give the GLUE --task whose file this is")
        else:
            raise ValueError(f"{option} {col!r}: {path} is read without a header (--header false), so name columns "
                             "by 0-based position")
    need = max(index.values()) + 1
    body = [(n, line.split("\t")) for n, line in enumerate(lines[1:] if layout.header else lines,
                                                           2 if layout.header else 1) if line.strip()]
    width = len(header) if layout.header else (len(body[0][1]) if body else 0)
    if width < need:
        raise ValueError(f"{path}: rows have {width} fields but the named columns need {need}; check the columns "
                         "or --header")
    bad = [n for n, fields in body if len(fields) != width]
    if bad and not layout.skip_bad_rows:
        n, fields = next((n, f) for n, f in body if n == bad[0])
        raise ValueError(f"{path}:{n}: {len(fields)} fields where the {'header' if layout.header else 'first row'} "
                         f"has {width} ({len(bad)} such rows, lines {', '.join(map(str, bad[:5]))}"
                         f"{' ...' if len(bad) > 5 else ''}): a tab inside a field shifts the columns (the file is "
                         "read tab-separated, unquoted, as GLUE's are); fix those rows, or pass --skip_bad_rows to "
                         "leave them out")
    first, second, labels, numbers = [], [] if layout.sentence2 is not None else None, [], []
    for n, fields in body:
        if len(fields) != width:
            continue
        first.append(fields[index["--sentence1"]].strip())
        if second is not None:
            second.append(fields[index["--sentence2"]].strip())
        labels.append(fields[index["--label"]].strip())
        numbers.append(n)
    if not labels:
        raise ValueError(f"{path}: no row with the {width} fields of the header ({len(bad)} rows of another count); "
                         "check the file or --header")
    return Rows(first, second, labels, numbers, bad)


def label_values(rows: Rows, layout: Layout, path: str) -> tuple[list, list[str] | None]:
    """(class index or float target per row, class names or None for regression); ValueError on a bad value."""
    col = layout.label
    if layout.labels is None:
        out = []
        for value, n in zip(rows.labels, rows.lines):
            try:
                out.append(float(value))
            except ValueError:
                raise ValueError(f"{path}:{n}: the label column {col!r} holds {value[:40]!r}, not a number; a "
                                 "regression task needs numeric labels (drop --regression for class labels)") from None
        return out, None
    names = list(layout.labels) or sorted(set(rows.labels))
    index = {c: i for i, c in enumerate(names)}
    for value, n in zip(rows.labels, rows.lines):
        if value not in index:
            raise ValueError(f"{path}:{n}: label {value[:40]!r} in column {col!r} is not one of the classes "
                             f"{', '.join(names)}; give --label_names with every class (the same for train and dev)")
    if len(names) < 2:
        raise ValueError(f"{path}: the label column {col!r} holds one class ({names[0]}); classification needs "
                         "two or more (or --regression for a numeric score)")
    return [index[v] for v in rows.labels], names


def task_metric(metric: str, names: list[str] | None) -> str:
    """The metric that picks the best checkpoint: the task's, unless the labels make it meaningless
    (a regression of a classification task's file, F1 beyond two classes)."""
    if names is None:
        return metric if metric in ("pearson", "spearman", "pearson_and_spearman") else "pearson_and_spearman"
    if metric in ("pearson", "spearman", "pearson_and_spearman"):
        return "accuracy"
    if len(names) != 2 and metric in ("f1", "acc_and_f1"):
        return "accuracy"
    return metric


def join(a: list[int], b: list[int] | None, max_positions: int) -> np.ndarray:
    """fairseq sentence_prediction: <s> a </s> [</s> b </s>], cut to max_positions."""
    ids = [BOS, *a, EOS] + ([EOS, *b, EOS] if b is not None else [])
    return np.asarray(ids[:max_positions], dtype=np.int64)


def encode_rows(rows: Rows, spm_model: str, max_positions: int) -> tuple[list[np.ndarray], int]:
    """The joined ids of every row, and how many were cut to max_positions."""
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    first = sp.encode(rows.first)
    second = sp.encode(rows.second) if rows.second is not None else [None] * len(first)
    out = [join(a, b, max_positions) for a, b in zip(first, second)]
    cut = sum(1 for a, b in zip(first, second) if 3 + len(a) + (len(b) + 2 if b is not None else 0) > max_positions)
    return out, cut


def make_sample(ids: np.ndarray, label, regression: bool, source: str, vocab: int) -> dict:
    """One shard sample: ids as .npy (uint16 when the vocabulary fits), the class or target, provenance."""
    out = io.BytesIO()
    np.save(out, ids.astype(np.uint16 if vocab <= 1 << 16 else np.int32))
    return {TEXT_EXT: out.getvalue(), (TARGET_EXT if regression else CLASS_EXT): repr(label) if regression
            else str(label), SOURCE_EXT: source}
