"""d2v-shard: the data preparation CLI (fire).

  d2v-shard image SRC DST [--maxcount N] [--maxsize BYTES] [--workers N] [--max_size PX]

DST is a shard pattern (`out/train-%06d.tar`) or a directory (`out/` -> `out/shard-%06d.tar`).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fire


class ShardCliError(SystemExit):
    def __init__(self, msg: str):
        super().__init__(f"d2v-shard: error: {msg}")


def _summary(index: dict, what: str) -> None:
    print(f"wrote {index['samples']} {what} in {len(index['shards'])} shards "
          f"({index['bytes'] / 1e6:.1f} MB); skipped {index.get('skipped_inputs', 0)} inputs"
          + (f" (listed in {index['skipped_report']})" if index.get("skipped_report") else ""))


def image(src: str, dst: str, maxcount: int = 10_000, maxsize: float = 1e9, workers: int = os.cpu_count() or 1,
          max_size: int | None = None, seed: int = 0, index: str | None = None) -> None:
    """Shard an image folder (or ImageNet train layout: one subfolder per class) as jpg/png + cls."""
    from .image import encode_image, find_images
    from .pipeline import shard
    from .sink import SinkError, normalize_pattern

    root = Path(src)
    if not root.is_dir():
        raise ShardCliError(f"{src} is not a directory of images")
    files, classes = find_images(src)
    if not files:
        raise ShardCliError(f"{src} contains no images ({', '.join(sorted(e for e in ('jpg', 'png', 'webp')))}...)")
    try:
        pattern = normalize_pattern(dst)
    except SinkError as e:
        raise ShardCliError(str(e)) from None
    meta = {"modality": "image", "source": str(root.resolve()), "classes": len(classes) if classes else 0}
    result = shard([(src, rel, label, max_size) for rel, label in files], encode_image, pattern,
                   keys=[rel for rel, _ in files], maxcount=maxcount, maxsize=maxsize, workers=workers,
                   seed=seed, desc="image", meta=meta, index=index)
    if classes:
        out = Path(pattern).parent / "classes.json"
        out.write_text(json.dumps({c: i for i, c in enumerate(classes)}, indent=1) + "\n")
    _summary(result, "images")


def main(argv: list[str] | None = None) -> None:
    fire.Fire({"image": image}, command=argv, name="d2v-shard")


if __name__ == "__main__":
    main(sys.argv[1:])
