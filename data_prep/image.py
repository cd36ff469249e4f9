"""Image sources: a folder of images, or an ImageNet train layout (one subfolder per class).

Images are stored as found (bytes unchanged) unless `max_size` asks for a smaller longer side, in
which case they are re-encoded as JPEG (quality 95). Every image is opened once to reject files
PIL cannot decode before they reach a shard.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from d2v_scale.data.format import CLASS_EXT, IMAGE_EXTS, SOURCE_EXT

SUFFIXES = {f".{e}" for e in IMAGE_EXTS}


def find_images(src: str) -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """[(relative path, class index | None)], class names (None for a flat folder), sorted."""
    root = Path(src)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    flat = [p for p in files if p.parent == root]
    if classes and not flat:                                   # ImageNet layout: class/xxx.JPEG
        index = {c: i for i, c in enumerate(classes)}
        return [(str(p.relative_to(root)), index[p.relative_to(root).parts[0]]) for p in files], classes
    return [(str(p.relative_to(root)), None) for p in files], None


def encode_image(root: str, rel: str, label: int | None, max_size: int | None) -> dict:
    """Sample fields for one image (raises on an unreadable file; the caller reports it)."""
    path = Path(root) / rel
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            ext = (im.format or path.suffix.lstrip(".")).lower()
            if max_size and max(im.size) > max_size:
                im = im.convert("RGB")
                im.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=95)
                data, ext = buf.getvalue(), "jpg"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"not a readable image: {e}") from None
    ext = {"jpeg": "jpg"}.get(ext, ext)
    if ext not in IMAGE_EXTS:
        raise ValueError(f"unsupported image format {ext!r}")
    sample = {ext: data, SOURCE_EXT: rel}
    if label is not None:
        sample[CLASS_EXT] = str(label)
    return sample
