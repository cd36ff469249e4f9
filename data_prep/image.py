"""Image sources: a folder of images, or an ImageNet train layout (one subfolder per class).

Class folders are the subfolders of SRC (links to folders too; hidden `.name` folders are not classes),
searched recursively with links followed, each real folder once (a link back up the tree is not
walked twice). As torchvision's ImageFolder does, a class folder without images is refused (it would
be a class with no sample); so are images lying beside the class folders (they have no class):
`labels="none"` shards every image unlabelled instead.

Images are stored as found (bytes unchanged) unless `max_size` asks for a smaller longer side, in
which case they are re-encoded as JPEG (quality 95). Every image is opened once to reject files
PIL cannot decode, and images above `max_pixels` (width x height, read from the header before any
decoding), before they reach a shard.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from d2v_scale.data.format import CLASS_EXT, IMAGE_EXTS, SOURCE_EXT
from d2v_scale.data.image import MAX_IMAGE_PIXELS, ImageTooLarge, open_image

SUFFIXES = {f".{e}" for e in IMAGE_EXTS}


def _walk(folder: Path, seen: set[tuple[int, int]]) -> list[Path]:
    """Image files under `folder`, links to folders followed; a real folder already in `seen` is skipped."""
    out = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []                                        # a loop, or a folder reached twice
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        out += [Path(top) / n for n in names if Path(n).suffix.lower() in SUFFIXES and (Path(top) / n).is_file()]
    return sorted(out)


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def find_images(src: str, labels: str = "auto") -> tuple[list[tuple[str, int | None]], list[str] | None]:
    """[(relative path, class index | None)], class names (None for a flat folder), sorted. `labels`:
    auto (class folders when SRC has subfolders) | none (every image, unlabelled). ValueError names
    empty class folders and images outside the class folders."""
    root = Path(src)
    if labels not in ("auto", "none"):
        raise ValueError(f"--labels {labels}: auto (class subfolders when there are any) or none (no labels)")
    folders = [] if labels == "none" else root.iterdir()
    classes = sorted(d.name for d in folders if d.is_dir() and not d.name.startswith("."))
    if not classes:
        return [(str(p.relative_to(root)), None) for p in _walk(root, set())], None
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if loose:
        raise ValueError(f"{src} has {len(classes)} class folders and {len(loose)} images beside them, which belong to "
                         f"no class ({_listed(loose)}): move them into a class folder or out of {src}, or pass "
                         "--labels none to shard every image without labels")
    real: dict[str, str] = {}
    for c in classes:
        other = real.setdefault(os.path.realpath(root / c), c)
        if other != c:
            raise ValueError(f"{src}: class folders {other} and {c} are the same folder (a link): its images would "
                             "belong to two classes; remove the link or copy the images")
    seen = {(os.stat(root).st_dev, os.stat(root).st_ino)}
    found = {c: _walk(root / c, seen) for c in classes}
    empty = [c for c in classes if not found[c]]
    if empty:
        raise ValueError(f"{src}: {len(empty)} of {len(classes)} class folders hold no images ({_listed(empty)}): "
                         "each would be a class with no sample; remove them or add their images")
    return [(str(p.relative_to(root)), i) for i, c in enumerate(classes) for p in found[c]], classes


def encode_image(root: str, rel: str, label: int | None, max_size: int | None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Sample fields for one image (raises on an unreadable file or one above max_pixels; the caller
    reports it)."""
    path = Path(root) / rel
    data = path.read_bytes()
    try:
        with open_image(data, max_pixels) as im:
            im.load()
            ext = (im.format or path.suffix.lstrip(".")).lower()
            if max_size and max(im.size) > max_size:
                im = im.convert("RGB")
                im.thumbnail((max_size, max_size), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=95)
                data, ext = buf.getvalue(), "jpg"
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"not a readable image: {e}") from None
    ext = {"jpeg": "jpg"}.get(ext, ext)
    if ext not in IMAGE_EXTS:
        raise ValueError(f"unsupported image format {ext!r}")
    sample = {ext: data, SOURCE_EXT: rel}
    if label is not None:
        sample[CLASS_EXT] = str(label)
    return sample
