"""Class labels for audio and text sources (`--labels FILE.tsv|folders`); images take theirs from
class subfolders (image.py). FILE.tsv: `relative/path<TAB>class name` per line (paths relative to
SRC, as a wav2vec manifest lists them); `folders`: the first folder under SRC names the class. Class
indices follow the sorted names (torchvision ImageFolder's order), written as classes.json.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_labels(spec: str, files: list[str]) -> tuple[dict[str, int], list[str]]:
    """({relative path: class index}, sorted class names) for every file; ValueError names what is missing."""
    if spec == "folders":
        flat = [f for f in files if len(Path(f).parts) < 2]
        if flat:
            raise ValueError(f"--labels folders: {len(flat)} files are not inside a class folder (first: {flat[0]}); "
                             "put each file under SRC/<class>/, or give --labels FILE.tsv")
        names = {f: Path(f).parts[0] for f in files}
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--labels {spec}: not a file; give FILE.tsv (path<TAB>class per line) or 'folders'")
        given = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[1].strip():
                raise ValueError(f"--labels {spec}:{n}: expected 'relative/path<TAB>class', got {line[:80]!r}")
            given[parts[0].strip()] = parts[1].strip()
        missing = [f for f in files if f not in given]
        if missing:
            raise ValueError(f"--labels {spec}: {len(missing)} of {len(files)} files have no class (first: {missing[0]}); "
                             "list every file (paths relative to SRC) or remove the others from SRC")
        names = {f: given[f] for f in files}
    classes = sorted(set(names.values()))
    index = {c: i for i, c in enumerate(classes)}
    return {f: index[c] for f, c in names.items()}, classes


def classes_json(classes: list[str]) -> bytes:
    """The classes.json written beside the shards (class name -> index), as for images."""
    return (json.dumps({c: i for i, c in enumerate(classes)}, indent=1) + "\n").encode()
