"""What a pickled file would import when loaded, read from its opcodes without running it.

torch.load(weights_only=True) stops at the first global it refuses and names only that one; a
crafted file can put a harmless-looking class first. `foreign_globals` lists every global the
file's pickles name (torch's zip format or the legacy stream), less those torch's weights-only
loader allows, so a refusal can tell a fairseq checkpoint whose config is an object (omegaconf,
argparse) from a file that would run a command.
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

# classes a fairseq checkpoint holds beyond tensors: its config (omegaconf, argparse, enums of fairseq)
# and numpy scalars of its training state; for a file naming only these, converting it where
# fairseq is installed is sensible advice
FAIRSEQ_ROOTS = ("omegaconf.", "fairseq.", "typing.", "enum.")
FAIRSEQ_NAMES = {"argparse.Namespace", "collections.defaultdict",
                 "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                 "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                 "pathlib.PosixPath", "pathlib.WindowsPath"}


def _torch_allowed() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return set(_get_allowed_globals())
    except (ImportError, AttributeError):   # another torch: judge every global by the lists above
        return set()


def _pickles(path: Path) -> list[bytes]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
    return [path.read_bytes()]


def _globals_of(data: bytes) -> set[str]:
    """Every `module.name` the pickle's GLOBAL / STACK_GLOBAL opcodes name ('?' when not resolvable)."""
    found, strings, memo = set(), [], {}
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):        # the legacy format is several pickles one after another
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    mod, name = (strings[-2:] + [None, None])[:2] if len(strings) >= 2 else (None, None)
                    found.add(f"{mod}.{name}" if isinstance(mod, str) and isinstance(name, str) else "?")
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                    strings.append(arg)
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(arg))
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name not in ("FRAME", "PROTO"):
                    strings.append(None)
                if op.name == "STOP":
                    break
            else:
                break
    except ValueError:                          # truncated or not a pickle: the loader says so
        pass
    return found


def foreign_globals(path: str | Path) -> tuple[set[str], set[str]]:
    """(globals a fairseq checkpoint may hold, every other global) the file names beyond torch's allowed ones."""
    allowed = _torch_allowed()
    names = set().union(*[_globals_of(d) for d in _pickles(Path(path))]) - allowed
    fairseq = {n for n in names if n.startswith(FAIRSEQ_ROOTS) or n in FAIRSEQ_NAMES}
    return fairseq, names - fairseq
