"""Which files a caption run works on: folders (optionally recursive), globs, explicit files and
`@list.txt` files (one path a line, relative to the list's folder), de-duplicated, in sorted order.

Videos: `VIDEO_EXTENSIONS` is empty until the video issue lands; add the extensions there and give
`Captioner` a video path (see `kind_of`), nothing else here changes."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

from edgekv.errors import EdgeKVError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
VIDEO_EXTENSIONS: frozenset[str] = frozenset()  # hook for the video branch (e.g. ".mp4", ".webm", ".mkv")


class InputError(EdgeKVError):
    """An input argument names nothing usable (missing folder, empty glob, unreadable list). Exit code 2."""


def kind_of(path: Path) -> str | None:
    """'image', 'video' or None (unsupported) from the file extension."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def _supported(path: Path) -> bool:
    return path.is_file() and kind_of(path) is not None


def _walk(folder: Path, recursive: bool) -> Iterable[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    # Hidden files (e.g. macOS ._foo.jpg resource forks) are not images.
    return (p for p in it if _supported(p) and not p.name.startswith("."))


def _read_list(spec: str) -> list[Path]:
    lst = Path(spec[1:]).expanduser()
    try:
        lines = lst.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read the input list {lst}: {e.strerror or e}") from None
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            # Entries are kept even when missing or unsupported: that is a per-input failure, reported
            # and counted, not a reason to refuse the whole batch.
            out.append(p if p.is_absolute() else lst.parent / p)
    return out


def collect_inputs(specs: Iterable[str], recursive: bool = False) -> list[Path]:
    """Expand INPUTS to a sorted, de-duplicated list of absolute paths. A folder gives its supported
    files (recursively with `recursive`), a glob its supported matches, `@file` the listed paths, a file
    itself (even with an unsupported extension, which then fails on its own and is reported)."""
    found: dict[str, Path] = {}
    for spec in specs:
        if spec.startswith("@") and len(spec) > 1:
            paths = _read_list(spec)
        else:
            p = Path(spec).expanduser()
            if p.is_dir():
                paths = list(_walk(p, recursive))
            elif p.exists():
                paths = [p]
            elif glob.has_magic(spec):
                hits = [Path(h) for h in glob.glob(os.path.expanduser(spec), recursive=recursive)]
                paths = [h for h in hits if _supported(h)]
                if not paths:
                    raise InputError(f"no image matches {spec!r}")
            else:
                raise InputError(f"input not found: {spec}")
        for q in paths:
            q = Path(os.path.abspath(q))
            found.setdefault(str(q), q)
    return [found[k] for k in sorted(found)]
