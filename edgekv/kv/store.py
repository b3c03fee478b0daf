"""The recall store: original K/V rows of compacted cells, kept outside the llama.cpp context.

Keys in a state blob are post-RoPE (M-RoPE included) and, on a quantized cache, rotated, so a row is
self-contained: written back into any slot it is the original token again (docs/recall.md). The store
keeps, for every cell that a compaction took as a candidate (kept, merged or evicted alike), its rows in
every layer of the global block, its position (and M-RoPE ext), its media index and the ledger's cell
id, which orders the universe the next question chooses from.

Where the rows live:
- `ram`: numpy arrays in host memory, one per layer and K/V (on a unified-memory Mac or a CPU-only
  machine this gives part of the saving back; on a discrete GPU it moves the cells from VRAM to cheaper
  RAM);
- `disk`: a file under a folder (default: a temporary one), written and read with plain file I/O (no
  mapping: the rows sit in the OS page cache, which the OS reclaims, not in the process), removed when
  the store is closed or garbage collected, and at interpreter exit. Each appended batch is laid out
  layer by layer (K rows of layer 0, V rows of layer 0, K rows of layer 1, ...), so one layer of every
  stored cell is read without the others (`layer_rows`: a re-selection holds one layer at a time, not
  the store). Every segment carries a CRC32, checked when it is read, so a file changed or cut behind
  our back is a `RecallStoreError`.

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

    @property
    def seg_rows(self) -> tuple[int, ...]:
        """Bytes per row of each segment, in file order: K of layer 0, V of layer 0, K of layer 1, ..."""
        return tuple(b for kv in zip(self.k_rows, self.v_rows) for b in kv)


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


@dataclass
class _Batch:
    """One append to a disk store: rows [start, stop) at `offset`, each segment (a layer's K or V rows)
    `written` rows long (more than stop - start once a rollback cut it), with a CRC32 per segment over
    its valid rows."""

    start: int
    stop: int
    offset: int
    written: int
    crcs: list[int]


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
        self._segs: list[np.ndarray] | None = None   # ram: per segment (K0, V0, K1, ...) [capacity, bytes]
        self._batches: list[_Batch] = []              # disk
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
        segs = []
        for il, layer in enumerate(block.layers):
            segs.append(_convert(layer.k[idx], lay.k_types[il], lay.k_store[il]))
            segs.append(_convert(layer.v[idx], lay.v_types[il], lay.v_store[il]))
        self._append(segs, idx.size)
        self.cid = np.concatenate([self.cid, cid.astype(np.int64)])
        self.pos = np.concatenate([self.pos, block.pos[idx].astype(np.int32)])
        self.media = np.concatenate([self.media, media.astype(np.int32)])
        if self.has_ext:
            self.ext = np.concatenate([self.ext, block.ext[idx].astype(np.int32)])

    def _append(self, segs: list[np.ndarray], k: int) -> None:
        """k rows, given as their segments in stored types; advances n."""
        n0, n1 = self.n, self.n + k
        if self.mode == "ram":
            self._reserve(n1)
            for store, seg in zip(self._segs, segs):
                store[n0:n1] = seg
        else:
            if self._path is None:
                self._open_file()
            last = self._batches[-1] if self._batches else None
            offset = 0 if last is None else last.offset + last.written * self.layout.row_bytes
            segs = [np.ascontiguousarray(seg) for seg in segs]
            try:
                with open(self._path, "r+b") as f:
                    f.seek(offset)
                    for seg in segs:
                        f.write(memoryview(seg))
            except OSError as e:
                raise RecallStoreError(f"cannot write the recall store file {self._path}: {e.strerror or e}") from None
            self._batches.append(_Batch(n0, n1, offset, k, [zlib.crc32(memoryview(seg)) for seg in segs]))
        self.n = n1

    def _reserve(self, n: int) -> None:
        cap = 0 if self._segs is None else self._segs[0].shape[0]
        if n <= cap:
            return
        new_cap = max(n, cap + cap // 4, 256)   # RAM held stays close to what is stored
        segs = []
        for j, width in enumerate(self.layout.seg_rows):
            seg = np.empty((new_cap, width), np.uint8)
            if self._segs is not None:
                seg[:self.n] = self._segs[j][:self.n]
            segs.append(seg)
        self._segs = segs

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
    def layer_rows(self, il: int, which: str, n: int | None = None) -> np.ndarray:
        """Layer il's K (`which="k"`) or V rows of the first n stored cells (all when None), in the
        cache's type, store order: [n, row bytes] uint8. One layer is read, not the store."""
        n = self.n if n is None else n
        lay = self.layout
        j = 2 * il + (which == "v")
        stored = (lay.k_store if which == "k" else lay.v_store)[il]
        cache = (lay.k_types if which == "k" else lay.v_types)[il]
        return _convert(self._segments([j], n)[0], stored, cache)

    def rows(self, n: int | None = None) -> KVBlock:
        """The first n stored cells (all when None) as a KVBlock in the cache's types, in store order."""
        n = self.n if n is None else n
        if self.layout is None or n == 0:
            raise EdgeKVError("internal: rows() of an empty recall store")
        layers = [LayerKV(self.layout.k_types[il], self.layer_rows(il, "k", n), self.layout.v_types[il],
                          self.layer_rows(il, "v", n)) for il in range(len(self.layout.k_types))]
        return KVBlock(pos=self.pos[:n].copy(), seq_id=np.zeros(n, np.int32),
                       ext=None if self.ext is None else self.ext[:n].copy(), v_trans=self.v_trans, layers=layers)

    def _segments(self, js: list[int], n: int, start: int = 0) -> list[np.ndarray]:
        """Segments js of rows [start, n) as stored: views of the RAM arrays, or read from the file (only
        the batches holding those rows; the file's size and each batch's checksums checked: a file cut or
        changed behind our back is an error). `start` is a batch's first row."""
        if self.mode == "ram":
            return [self._segs[j][start:n] for j in js]
        widths = self.layout.seg_rows
        out = [np.empty((n - start, widths[j]), np.uint8) for j in js]
        row = self.layout.row_bytes
        try:
            with open(self._path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                for b in self._batches:
                    if b.start < start:
                        continue
                    if b.start >= n:
                        break
                    if size < b.offset + b.written * row:
                        raise RecallStoreError(f"the recall store file {self._path} was cut to {size} bytes "
                                               f"(it held {b.offset + b.written * row})")
                    valid = b.stop - b.start
                    for o, j in zip(out, js):
                        f.seek(b.offset + b.written * sum(widths[:j]))
                        seg = np.empty((valid, widths[j]), np.uint8)
                        f.readinto(memoryview(seg))
                        if zlib.crc32(memoryview(seg)) != b.crcs[j]:
                            raise RecallStoreError(f"the recall store file {self._path} was changed (rows "
                                                   f"{b.start}-{b.stop} fail their checksum)")
                        take = min(b.stop, n) - b.start
                        o[b.start - start:b.start - start + take] = seg[:take]
        except FileNotFoundError as e:
            raise RecallStoreError(f"the recall store file {self._path} is gone ({e.strerror or e})") from None
        except OSError as e:
            raise RecallStoreError(f"cannot read the recall store file {self._path}: {e.strerror or e}") from None
        return out

    # --- snapshots ------------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Forget rows from n on (a failed turn's)."""
        if n >= self.n:
            return
        self.n = n
        self.cid, self.pos, self.media = self.cid[:n], self.pos[:n], self.media[:n]
        if self.ext is not None:
            self.ext = self.ext[:n]
        self._batches = [b for b in self._batches if b.start < n]
        if self._batches and self._batches[-1].stop > n:   # re-checksum the cut batch's segments (it alone)
            b = self._batches[-1]
            segs = self._segments(list(range(len(self.layout.seg_rows))), b.stop, start=b.start)
            b.stop = n
            b.crcs = [zlib.crc32(memoryview(np.ascontiguousarray(seg[:n - b.start]))) for seg in segs]

    def fork(self, n: int) -> "RecallStore":
        """A new store holding this one's first n rows (a restored snapshot's own copy)."""
        new = self.fresh()
        if self.layout is None or n == 0:
            return new
        new.layout, new.has_ext, new.v_trans = self.layout, self.has_ext, self.v_trans
        new._append(self._segments(list(range(len(self.layout.seg_rows))), n), n)
        new.cid, new.pos, new.media = self.cid[:n].copy(), self.pos[:n].copy(), self.media[:n].copy()
        new.ext = None if self.ext is None else self.ext[:n].copy()
        return new

    def close(self) -> None:
        """Free the rows; a disk store's file (and its temporary folder) is removed. Idempotent."""
        self._segs = None
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
