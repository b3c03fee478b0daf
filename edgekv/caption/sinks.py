"""Where captions go, written so that a kill at any instant loses at most the input in flight.

- `SidecarSink`: `<stem><ext>` next to each image, written to a temporary file, fsynced, then renamed
  over the target (a reader sees the old file or the whole new one, never a part). Failures go to an
  errors JSONL (`edgekv-caption-errors.jsonl`).
- `JsonlSink`: one JSON record a line, each flushed and fsynced before the next input starts. On open a
  torn last line (killed mid-write) is cut off; records of failed inputs (and, with overwrite, of the
  inputs being redone) are dropped in an atomic rewrite, so the file holds at most one record per
  `file_name`.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterable

from edgekv.caption.inputs import InputError
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder + fsync + os.replace."""
    tmp = path.parent / f".{path.name}.edgekv-tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
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


class _AppendLog:
    """An append-only JSONL file: one record per call, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = None

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
        self.errors_path = errors_path
        self._errors = _AppendLog(errors_path) if errors_path else None
        self.notes: list[str] = []

    def key(self, image: Path) -> str:
        return str(self.sidecar(image))

    def sidecar(self, image: Path) -> Path:
        return image.with_name(image.stem + self.extension)

    def done(self, image: Path) -> bool:
        return self.sidecar(image).exists()

    def prepare(self, images: Iterable[Path], overwrite: bool) -> None:
        pass  # nothing to repair: a sidecar is whole or absent

    def write(self, image: Path, record: dict) -> dict:
        """Store one result; returns what was stored (an error record when the sidecar could not be
        written, e.g. a read-only folder: that input failed, the batch goes on)."""
        if "error" not in record:
            try:
                atomic_write_text(self.sidecar(image), record["text"] + "\n")
                return record
            except OSError as e:
                record = {**record, "error": f"cannot write {self.sidecar(image)}: {e.strerror or e}"}
                record.pop("text", None)
        if self._errors is not None:
            try:
                self._errors.append({"file_name": str(image), "error": record["error"],
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            except OSError as e:
                raise SinkError(f"cannot write the errors file {self.errors_path}: {e.strerror or e}") from None
        return record

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
        self.root.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self._f = None
        self._open_locked()
        self.records: dict[str, dict] = {}   # file_name -> record, as on disk after prepare()
        self._read()

    # --- open, lock, repair ---------------------------------------------------------------------
    def _open_locked(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = open(self.path, "a+b")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            self._f = None
            raise InputError(f"another process is writing {self.path} (edgekv caption running twice?)") from None

    def _read(self) -> None:
        f = self._f
        f.seek(0)
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a record cut short by a kill: drop it, its input is redone
            os.ftruncate(f.fileno(), end)
            os.fsync(f.fileno())
            self.notes.append(f"repaired a torn last line in {self.path} ({len(data) - end} bytes dropped)")
            data = data[:end]
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
        tmp = self.path.parent / f".{self.path.name}.edgekv-tmp"
        with open(tmp, "wb") as t:
            t.writelines(kept)
            t.flush()
            os.fsync(t.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.root)
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
