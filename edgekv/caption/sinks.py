"""Where captions go, written so that a kill at any instant loses at most the input in flight.

- `SidecarSink`: `<stem><ext>` next to each image, written to a temporary file of its own (a unique name in
  the same folder), fsynced, then renamed over the target (a reader sees the old file or the whole new one,
  never a part). Failures go to an errors JSONL (`edgekv-caption-errors.jsonl`; a torn last line is cut off
  when a run opens it again), and so do warnings (a video captioned from the frames read before its stream
  broke: `warning` instead of `error`). An extension that would put a caption over an input is refused.
- `JsonlSink`: one JSON record a line, each flushed and fsynced before the next input starts. On open a
  torn last line (killed mid-write) is cut off; records of failed inputs (and, with overwrite, of the
  inputs being redone) are dropped in an atomic rewrite, so the file holds at most one record per
  `file_name`.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

from edgekv.caption.inputs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, InputError
from edgekv.errors import EdgeKVError

ERRORS_NAME = "edgekv-caption-errors.jsonl"


class SinkError(EdgeKVError):
    """The output itself cannot be written (disk full, read-only): the run stops, done work stays."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry); not every filesystem allows it, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file of its own in the same folder (a unique name: two
    writers of one path never share a temp file) + fsync + os.replace."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".edgekv-tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, _mode_for(path))  # mkstemp makes 0600: keep the file's mode, or the umask's default
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def check_output_path(path: Path, option: str) -> None:
    """Refuse, as one clear line, an output whose folder cannot exist (a file on the way) or be made."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot create its folder ({e.strerror or e})") from None


def repair_torn_tail(f, path: Path) -> str | None:
    """Cut a last line left without its newline (a kill mid-write) off the open binary file `f`; returns
    the note to print, or None when the file ends cleanly."""
    f.seek(0)
    data = f.read()
    end = data.rfind(b"\n") + 1
    if end == len(data):
        return None
    os.ftruncate(f.fileno(), end)
    os.fsync(f.fileno())
    return f"repaired a torn last line in {path} ({len(data) - end} bytes dropped)"


class _AppendLog:
    """An append-only JSONL file: one record per call, flushed and fsynced. A torn last line left by a
    killed run is cut off when the log is opened again (`repair`), so the next record starts a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = None

    def repair(self) -> str | None:
        try:
            with open(self.path, "r+b") as f:
                return repair_torn_tail(f, self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise InputError(f"cannot open the errors file {self.path}: {e.strerror or e}") from None

    def append(self, record: dict) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab")
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class SidecarSink:
    """Captions as `<stem><extension>` files next to the images."""

    def __init__(self, extension: str = ".txt", errors_path: Path | None = None) -> None:
        if not extension or "/" in extension or extension in (".", ".."):
            raise InputError(f"bad caption extension {extension!r}")
        self.extension = extension if extension.startswith(".") else "." + extension
        if self.extension.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
            raise InputError(f"--caption-extension {self.extension} is an image/video extension: the captions "
                             "would replace the inputs; use e.g. .txt or .caption")
        self.errors_path = errors_path
        self._errors = _AppendLog(errors_path) if errors_path else None
        self.notes: list[str] = []
        if errors_path is not None:
            check_output_path(errors_path, "--errors-file")
            note = self._errors.repair()
            if note:
                self.notes.append(note)

    def key(self, image: Path) -> str:
        return str(self.sidecar(image))

    def sidecar(self, image: Path) -> Path:
        return image.with_name(image.stem + self.extension)

    def done(self, image: Path) -> bool:
        return self.sidecar(image).exists()

    def prepare(self, images: Iterable[Path], overwrite: bool) -> None:
        """Nothing to repair (a sidecar is whole or absent); refuse a sidecar that is an input itself (an
        unsupported file named as an input with the caption extension: it would pass as done, or be
        overwritten with text)."""
        for p in images:
            if self.sidecar(p) == p:
                raise InputError(f"the caption of {p} would be written over it (--caption-extension "
                                 f"{self.extension}); use another extension")

    def write(self, image: Path, record: dict) -> dict:
        """Store one result; returns what was stored (an error record when the sidecar could not be
        written, e.g. a read-only folder: that input failed, the batch goes on)."""
        if "error" not in record:
            try:
                atomic_write_text(self.sidecar(image), record["text"] + "\n")
            except OSError as e:
                record = {**record, "error": f"cannot write {self.sidecar(image)}: {e.strerror or e}"}
                record.pop("text", None)
            else:
                if record.get("warning"):  # captioned from part of a broken video: say so in the log
                    self._log(image, "warning", record["warning"])
                return record
        self._log(image, "error", record["error"])
        return record

    def _log(self, image: Path, key: str, message: str) -> None:
        if self._errors is not None:
            try:
                self._errors.append({"file_name": str(image), key: message,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            except OSError as e:
                raise SinkError(f"cannot write the errors file {self.errors_path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self._errors is not None:
            self._errors.close()


class JsonlSink:
    """One record per input in a JSONL file (`file_name` relative to the file's folder when inside it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.abspath(path))
        self.root = self.path.parent
        if self.path.is_dir():
            raise InputError(f"-o/--output {path} is a folder; give a file name such as {path}/metadata.jsonl")
        check_output_path(self.path, "-o/--output")
        self.notes: list[str] = []
        self._f = None
        self._open_locked()
        self.records: dict[str, dict] = {}   # file_name -> record, as on disk after prepare()
        self._read()

    # --- open, lock, repair ---------------------------------------------------------------------
    def _open_locked(self) -> None:
        if self._f is not None:
            self._f.close()
        try:
            self._f = open(self.path, "a+b")
        except OSError as e:  # /proc/x.jsonl, a read-only folder, ...
            raise InputError(f"-o/--output {self.path}: cannot write it ({e.strerror or e})") from None
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            self._f = None
            raise InputError(f"another process is writing {self.path} (edgekv caption running twice?)") from None

    def _read(self) -> None:
        f = self._f
        note = repair_torn_tail(f, self.path)  # a record cut short by a kill: dropped, its input is redone
        if note:
            self.notes.append(note)
        f.seek(0)
        data = f.read()
        bad = 0
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name = rec["file_name"]
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            self.records[name] = rec
        if bad:
            self.notes.append(f"{bad} unreadable line(s) in {self.path} kept as they are")

    def key(self, image: Path) -> str:
        try:
            return image.relative_to(self.root).as_posix()
        except ValueError:
            return str(image)

    def done(self, image: Path) -> bool:
        rec = self.records.get(self.key(image))
        return rec is not None and "error" not in rec

    def prepare(self, images: Iterable[Path], overwrite: bool) -> None:
        """Drop the records that this run replaces (failed inputs are retried; with `overwrite`, every
        input of this run), rewriting the file atomically so there is one record per file_name."""
        keys = {self.key(p) for p in images}
        drop = {k for k, r in self.records.items() if k in keys and (overwrite or "error" in r)}
        if not drop:
            return
        self._f.seek(0)
        kept = []
        for line in self._f.read().splitlines(keepends=True):
            try:
                name = json.loads(line).get("file_name")
            except (ValueError, AttributeError):
                name = None
            if name not in drop:
                kept.append(line)
        atomic_write(self.path, b"".join(kept))
        self._open_locked()
        for k in drop:
            del self.records[k]

    # --- write ----------------------------------------------------------------------------------
    def write(self, image: Path, record: dict) -> dict:
        rec = {"file_name": self.key(image), **record}
        try:
            self._f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # disk full, gone: nothing later could be saved either
            raise SinkError(f"cannot write {self.path}: {e.strerror or e}; rerun to resume") from None
        self.records[rec["file_name"]] = rec
        return record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
