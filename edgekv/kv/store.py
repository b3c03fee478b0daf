"""The recall store: original K/V rows of compacted cells, kept outside the llama.cpp context.

Keys in a state blob are post-RoPE (M-RoPE included) and, on a quantized cache, rotated, so a row is
self-contained: written back into any slot it is the original token again (docs/recall.md). The store
keeps, for every cell that a compaction took as a candidate (kept, merged or evicted alike), its rows in
every layer of the global block, its position (and M-RoPE ext), its media index and the ledger's cell
id, which orders the universe the next question chooses from.

Where the rows live:
- `ram`: a numpy array in host memory (on a unified-memory Mac or a CPU-only machine this gives part of
  the saving back; on a discrete GPU it moves the cells from VRAM to cheaper RAM);
- `disk`: a file under a folder (default: a temporary one), written and read with plain file I/O (no
  mapping: the rows sit in the OS page cache, which the OS reclaims, not in the process), removed when
  the store is closed or garbage collected, and at interpreter exit. Each appended batch carries a
  CRC32, checked when rows are read, so a file changed or cut behind our back is a `RecallStoreError`.

Rows are stored in the cache's own type (bit-identical when recalled) unless `row_type` asks for f16,
q8_0 or q4_0 (the codec's block formats; lossy for a lower type).

The store is append-only. A snapshot remembers (store, n); `truncate(n)` undoes a failed turn, and
`fork(n)` gives a restored snapshot its own copy when rows after n exist (another branch wrote them).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekv.errors import EdgeKVError
from edgekv.kv.codec import TYPE_IDS, KVBlock, LayerKV, row_elements
from edgekv.kv.dtypes import from_float, to_float

RECALL_MODES = ("off", "ram", "disk")
ROW_TYPES = ("f16", "q8_0", "q4_0")


class RecallStoreError(EdgeKVError):
    """The store's file is missing, cut or changed: its rows cannot be trusted."""


@dataclass(frozen=True)
class RowLayout:
    """Where each layer's K and V bytes sit in one stored row, and their types (stored and cache)."""

    k_types: tuple[int, ...]       # the cache's types, per layer
    v_types: tuple[int, ...]
    k_store: tuple[int, ...]       # the stored types
    v_store: tuple[int, ...]
    k_rows: tuple[int, ...]        # stored bytes per layer
    v_rows: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return sum(self.k_rows) + sum(self.v_rows)

    def offsets(self) -> list[tuple[int, int, int, int]]:
        """Per layer: (k start, k stop, v start, v stop) within a row."""
        out, off = [], 0
        for kr, vr in zip(self.k_rows, self.v_rows):
            out.append((off, off + kr, off + kr, off + kr + vr))
            off += kr + vr
        return out


def row_layout(block: KVBlock, row_type: str | None) -> RowLayout:
    """The layout for `block`'s layers, stored as they are (None) or as `row_type`."""
    check_row_type(row_type)
    ks, vs, kst, vst, kr, vr = [], [], [], [], [], []
    for layer in block.layers:
        for types, stored, rows, t, row in ((ks, kst, kr, layer.k_type, layer.k_row),
                                            (vs, vst, vr, layer.v_type, layer.v_row)):
            n = row_elements(t, row)
            st = t if row_type is None else TYPE_IDS[row_type]
            if st != t and n % 32:
                st = t   # a row that is not whole 32-value blocks cannot take q8_0/q4_0: kept as it is
            types.append(t)
            stored.append(st)
            rows.append(row if st == t else _row_bytes(st, n))
    return RowLayout(tuple(ks), tuple(vs), tuple(kst), tuple(vst), tuple(kr), tuple(vr))


def _row_bytes(type_id: int, n: int) -> int:
    from edgekv.kv.codec import GGML_TYPES

    _, blck, size = GGML_TYPES[type_id]
    return n // blck * size


class RecallStore:
    """Rows of compacted cells, in host memory (`mode="ram"`) or a file (`"disk"`)."""

    def __init__(self, mode: str = "ram", directory: str | os.PathLike | None = None,
                 row_type: str | None = None) -> None:
        if mode == "off":
            raise EdgeKVError("internal: a recall store for recall off")
        check_recall(mode, row_type)
        self.mode, self.row_type = mode, row_type
        self.directory = None if directory is None else Path(directory)
        if mode == "disk" and self.directory is not None:
            _check_folder(self.directory)   # now, not at the first compaction mid-turn
        self.layout: RowLayout | None = None
        self.n = 0
        self.cid = np.zeros(0, np.int64)
        self.pos = np.zeros(0, np.int32)
        self.ext: np.ndarray | None = None
        self.media = np.zeros(0, np.int32)
        self.has_ext = False
        self.v_trans = False
        self._data: np.ndarray | None = None     # ram: [capacity, row_bytes] uint8
        self._batches: list[tuple[int, int, int]] = []   # disk: (start, stop, crc32) per append
        self._path: Path | None = None
        self._tmpdir: str | None = None
        self._finalizer = None

    def fresh(self) -> "RecallStore":
        """A new, empty store with these settings (a new conversation, or one whose store was lost)."""
        return RecallStore(self.mode, self.directory, self.row_type)

    # --- size -----------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (what the store holds, not its capacity)."""
        return 0 if self.layout is None else self.n * self.layout.row_bytes

    @property
    def where(self) -> str:
        return "RAM" if self.mode == "ram" else str(self._path or self.directory or "a temporary folder")

    @property
    def path(self) -> Path | None:
        return self._path

    # --- writing --------------------------------------------------------------------------------
    def add(self, block: KVBlock, idx: np.ndarray, cid: np.ndarray, media: np.ndarray) -> None:
        """Append the cells `idx` of `block` (rows of every layer) with their cell ids and media index."""
        idx = np.asarray(idx, np.int64)
        if idx.size == 0:
            return
        if self.layout is None:
            self.layout = row_layout(block, self.row_type)
            self.has_ext, self.v_trans = block.ext is not None, block.v_trans
            if self.has_ext:
                self.ext = np.zeros((0, 3), np.int32)
        lay = self.layout
        if len(block.layers) != len(lay.k_types):
            raise EdgeKVError("internal: the recall store got rows of another layer count")
        n0, n1 = self.n, self.n + idx.size
        if self.mode == "ram":
            self._reserve(n1)
            out = self._data[n0:n1]
        else:
            out = np.empty((idx.size, lay.row_bytes), np.uint8)
        for il, (layer, (k0, k1, v0, v1)) in enumerate(zip(block.layers, lay.offsets())):
            out[:, k0:k1] = _convert(layer.k[idx], lay.k_types[il], lay.k_store[il])
            out[:, v0:v1] = _convert(layer.v[idx], lay.v_types[il], lay.v_store[il])
        self.cid = np.concatenate([self.cid, cid.astype(np.int64)])
        self.pos = np.concatenate([self.pos, block.pos[idx].astype(np.int32)])
        self.media = np.concatenate([self.media, media.astype(np.int32)])
        if self.has_ext:
            self.ext = np.concatenate([self.ext, block.ext[idx].astype(np.int32)])
        if self.mode == "disk":
            self._write(n0, out)
            self._batches.append((n0, n1, zlib.crc32(memoryview(out))))
        self.n = n1

    def _write(self, row0: int, rows: np.ndarray) -> None:
        if self._path is None:
            self._open_file()
        try:
            with open(self._path, "r+b") as f:
                f.seek(row0 * self.layout.row_bytes)
                f.write(memoryview(np.ascontiguousarray(rows)))
        except OSError as e:
            raise RecallStoreError(f"cannot write the recall store file {self._path}: {e.strerror or e}") from None

    def _reserve(self, n: int) -> None:
        row = self.layout.row_bytes
        cap = 0 if self._data is None else self._data.shape[0]
        if n <= cap:
            return
        new_cap = max(n, cap + cap // 4, 256)   # RAM held stays close to what is stored
        data = np.empty((new_cap, row), np.uint8)
        if self._data is not None:
            data[:self.n] = self._data[:self.n]
        self._data = data

    def _open_file(self) -> None:
        if self.directory is None:
            self._tmpdir = tempfile.mkdtemp(prefix="edgekv-recall-")
            folder = Path(self._tmpdir)
        else:
            folder = self.directory
            _check_folder(folder)
        fd, name = tempfile.mkstemp(prefix="edgekv-recall-", suffix=".kv", dir=folder)
        os.close(fd)
        self._path = Path(name)
        self._finalizer = weakref.finalize(self, _remove, self._path, self._tmpdir)

    # --- reading --------------------------------------------------------------------------------
    def rows(self, n: int | None = None) -> KVBlock:
        """The first n stored cells (all when None) as a KVBlock in the cache's types, in store order."""
        n = self.n if n is None else n
        if self.layout is None or n == 0:
            raise EdgeKVError("internal: rows() of an empty recall store")
        data = self._checked(n)
        lay, layers = self.layout, []
        for il, (k0, k1, v0, v1) in enumerate(lay.offsets()):
            layers.append(LayerKV(lay.k_types[il], _convert(data[:, k0:k1], lay.k_store[il], lay.k_types[il]),
                                  lay.v_types[il], _convert(data[:, v0:v1], lay.v_store[il], lay.v_types[il])))
        return KVBlock(pos=self.pos[:n].copy(), seq_id=np.zeros(n, np.int32),
                       ext=None if self.ext is None else self.ext[:n].copy(), v_trans=self.v_trans, layers=layers)

    def _checked(self, n: int) -> np.ndarray:
        """Rows [0, n), with the disk file checked first (a cut file would be a SIGBUS, not an error)."""
        data = self._read(0, n)
        if self.mode == "ram":
            return data
        for b0, b1, crc in self._batches:
            if b0 >= n:
                break
            if b1 > n:   # a batch truncated away by a rollback is not read
                continue
            if zlib.crc32(memoryview(data[b0:b1])) != crc:
                raise RecallStoreError(f"the recall store file {self._path} was changed (rows {b0}-{b1} "
                                       "fail their checksum)")
        return data

    # --- snapshots ------------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Forget rows from n on (a failed turn's)."""
        if n >= self.n:
            return
        self.n = n
        self.cid, self.pos, self.media = self.cid[:n], self.pos[:n], self.media[:n]
        if self.ext is not None:
            self.ext = self.ext[:n]
        self._batches = [b for b in self._batches if b[0] < n]
        if self._batches and self._batches[-1][1] > n:   # re-checksum the cut batch
            b0 = self._batches[-1][0]
            self._batches[-1] = (b0, n, zlib.crc32(memoryview(self._read(b0, n))))

    def _read(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) as they are stored: a view of the RAM array, or read from the file, whose size
        is checked first (a file cut behind our back is an error, not short rows)."""
        if self.mode == "ram":
            return self._data[r0:r1]
        row = self.layout.row_bytes
        try:
            with open(self._path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < r1 * row:
                    raise RecallStoreError(f"the recall store file {self._path} was cut to {size} bytes "
                                           f"(it held {r1 * row})")
                f.seek(r0 * row)
                data = np.empty((r1 - r0, row), np.uint8)
                f.readinto(memoryview(data))
        except FileNotFoundError as e:
            raise RecallStoreError(f"the recall store file {self._path} is gone ({e.strerror or e})") from None
        except OSError as e:
            raise RecallStoreError(f"cannot read the recall store file {self._path}: {e.strerror or e}") from None
        return data

    def fork(self, n: int) -> "RecallStore":
        """A new store holding this one's first n rows (a restored snapshot's own copy)."""
        new = self.fresh()
        if self.layout is None or n == 0:
            return new
        new.layout, new.has_ext, new.v_trans = self.layout, self.has_ext, self.v_trans
        rows = np.ascontiguousarray(self._checked(n))
        if new.mode == "ram":
            new._reserve(n)
            new._data[:n] = rows
        else:
            new._write(0, rows)
            new._batches = [(0, n, zlib.crc32(memoryview(rows)))]
        new.cid, new.pos, new.media = self.cid[:n].copy(), self.pos[:n].copy(), self.media[:n].copy()
        new.ext = None if self.ext is None else self.ext[:n].copy()
        new.n = n
        return new

    def close(self) -> None:
        """Free the rows; a disk store's file (and its temporary folder) is removed. Idempotent."""
        self._data = None
        self.n = 0
        if self._finalizer is not None:
            self._finalizer()


def _convert(rows: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return rows
    return from_float(to_float(np.ascontiguousarray(rows), src), dst)


def _check_folder(folder: Path) -> None:
    """--recall-dir exists (or can be made) and takes files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeKVError(f"--recall-dir {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EdgeKVError(f"--recall-dir {folder}: not writable")


def _remove(path: Path, tmpdir: str | None) -> None:
    try:
        path.unlink()
    except OSError:
        pass
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def check_recall(mode: str, row_type: str | None) -> None:
    """Refuse unknown settings before anything loads."""
    if mode not in RECALL_MODES:
        raise EdgeKVError(f"--recall must be one of {', '.join(RECALL_MODES)}, got {mode!r}")
    check_row_type(row_type)


def check_row_type(row_type: str | None) -> None:
    if row_type is not None and row_type not in ROW_TYPES:
        raise EdgeKVError(f"--recall-type must be one of {', '.join(ROW_TYPES)}, got {row_type!r}")
