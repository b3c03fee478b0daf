"""Bytes <-> cells: one sequence's KV state as `llama_state_seq_get_data` writes it.

Layout (llama-cpp-python 0.3.36, vendored llama.cpp 0c1e57098; see docs/state-format.md):

    u32 magic 0xaf143cd8, i32 seq_id
    per KV block (1 for a plain cache; 2 for iSWA: base then sliding-window):
      u32 n_stream (must be 1), u32 cell_count
      cell_count x { i32 pos, u32 n_seq_id (=1), [i32 x, i32 y, i32 tok if ext], i32 seq_id }
      u32 v_trans, u32 n_layer
      n_layer x { i32 k_type, u64 k_row_size, cell_count*k_row_size bytes }
      v_trans=0: n_layer x { i32 v_type, u64 v_row_size, cell_count*v_row_size bytes }
      v_trans=1: n_layer x { i32 v_type, u32 v_el_size, u32 n_embd_v, n_embd_v*cell_count*el bytes (dim-major) }

The blob does not say whether cells carry the 12-byte ext (M-RoPE models) nor how many blocks follow:
the caller passes `has_ext` and `n_blocks` from the model. Everything else is checked: a blob whose sizes do
not add up exactly is rejected with StateFormatError before anything reaches llama.cpp.

V is held cell-major in memory ([cells, row bytes]) whatever `v_trans` says, so selection and packing
are the same code for both layouts; `serialize_state` transposes back.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field, replace

import numpy as np

from edgekv.errors import StateFormatError

MAGIC = 0xAF143CD8

# ggml_type id -> (name, values per block, bytes per block). The cache types llama.cpp supports for K/V.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("f32", 1, 4),
    1: ("f16", 1, 2),
    2: ("q4_0", 32, 18),
    8: ("q8_0", 32, 34),
    30: ("bf16", 1, 2),
}
TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}


def type_name(type_id: int) -> str:
    try:
        return GGML_TYPES[type_id][0]
    except KeyError:
        raise StateFormatError(f"KV cache type id {type_id} is not supported (f32, f16, bf16, q8_0, q4_0)") from None


def row_elements(type_id: int, row_bytes: int) -> int:
    """Values in a row of `row_bytes` bytes of `type_id` (whole ggml blocks)."""
    _, blck, size = GGML_TYPES[type_id]
    if row_bytes % size:
        raise StateFormatError(f"a {type_name(type_id)} row of {row_bytes} bytes is not whole blocks")
    return row_bytes // size * blck


@dataclass(eq=False)
class LayerKV:
    """One layer's K and V rows for the block's cells, cell-major uint8 [n_cells, row_bytes]."""

    k_type: int
    k: np.ndarray
    v_type: int
    v: np.ndarray

    @property
    def n_embd_k(self) -> int:
        return row_elements(self.k_type, self.k.shape[1])

    @property
    def n_embd_v(self) -> int:
        return row_elements(self.v_type, self.v.shape[1])

    @property
    def k_row(self) -> int:
        return int(self.k.shape[1])

    @property
    def v_row(self) -> int:
        return int(self.v.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def v_dim_major(self) -> np.ndarray:
        """V as a blob with v_trans stores it: [n_embd_v, cells, element bytes] (a view of `v`)."""
        el = GGML_TYPES[self.v_type][2]
        return self.v.reshape(self.v.shape[0], -1, el).transpose(1, 0, 2)


class LazyLayerKV:
    """A LayerKV whose rows are made when read (`k`, `v`: a fresh array on every access), so a whole
    cache is never held twice: the writer takes one layer at a time (compaction, `state_buffer`)."""

    k_type: int
    v_type: int
    k_row: int
    v_row: int
    n_cells: int

    @property
    def n_embd_k(self) -> int:
        return row_elements(self.k_type, self.k_row)

    @property
    def n_embd_v(self) -> int:
        return row_elements(self.v_type, self.v_row)

    @property
    def nbytes(self) -> int:
        return self.n_cells * (self.k_row + self.v_row)

    def v_dim_major(self) -> np.ndarray:
        el = GGML_TYPES[self.v_type][2]
        return self.v.reshape(self.n_cells, -1, el).transpose(1, 0, 2)


class TakenLayerKV(LazyLayerKV):
    """Cells `idx` of a lazy layer, taken when read (KVBlock.take)."""

    def __init__(self, layer: LazyLayerKV, idx: np.ndarray) -> None:
        self._layer, self._idx = layer, idx
        self.k_type, self.v_type, self.k_row, self.v_row = layer.k_type, layer.v_type, layer.k_row, layer.v_row
        self.n_cells = len(idx)

    @property
    def k(self) -> np.ndarray:
        return self._layer.k[self._idx]

    @property
    def v(self) -> np.ndarray:
        return self._layer.v[self._idx]


class TransposedLayerKV(LazyLayerKV):
    """A layer parsed without copy from a v_trans blob: K rows are a view into the blob, V stays in the
    blob's dim-major layout and is transposed to cell-major rows when read."""

    def __init__(self, k_type: int, k: np.ndarray, v_type: int, v_raw: np.ndarray) -> None:
        self.k_type, self.k, self.v_type, self._raw = k_type, k, v_type, v_raw   # raw [n_embd_v, n, el]
        self.k_row, self.n_cells = int(k.shape[1]), int(k.shape[0])
        self.v_row = int(v_raw.shape[0] * v_raw.shape[2])

    @property
    def v(self) -> np.ndarray:
        return self._raw.transpose(1, 0, 2).reshape(self.n_cells, self.v_row)

    def v_dim_major(self) -> np.ndarray:
        return self._raw


@dataclass(eq=False)
class KVBlock:
    """The cells of one KV cache (base or sliding-window) for one sequence, in blob order."""

    pos: np.ndarray                      # [n] int32 logical position (label) of each cell
    seq_id: np.ndarray                   # [n] int32 (always the saved sequence)
    ext: np.ndarray | None               # [n, 3] int32 (x, y, tok) for M-RoPE cells, else None
    v_trans: bool
    layers: list[LayerKV] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return int(self.pos.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """K and V bytes held by these cells."""
        return int(sum(l.nbytes for l in self.layers))

    def take(self, idx: np.ndarray) -> "KVBlock":
        """The block restricted to cells `idx` (in that order); rows are copied byte for byte (lazy
        layers stay lazy: a layer's rows are taken when it is read)."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(self, pos=self.pos[idx], seq_id=self.seq_id[idx],
                       ext=None if self.ext is None else self.ext[idx],
                       layers=[TakenLayerKV(l, idx) if isinstance(l, LazyLayerKV)
                               else LayerKV(l.k_type, l.k[idx], l.v_type, l.v[idx]) for l in self.layers])


@dataclass(eq=False)
class SeqState:
    seq_id: int
    blocks: list[KVBlock]
    has_ext: bool

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


class _Reader:
    def __init__(self, blob, copy: bool = True, path: str | None = None, start: int = 0):
        self.buf = memoryview(blob).cast("B")
        self.off = start
        self.copy = copy
        self.path = path     # a state file: K/V rows are left in it (FileRows), read when used

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.off + n > len(self.buf):
            raise StateFormatError(f"KV state blob is truncated or not understood (reading {what} at byte "
                                   f"{self.off}, {len(self.buf)} bytes in all)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        vals = struct.unpack_from(fmt, self.buf, self.off)
        self.off += n
        return vals if len(vals) > 1 else vals[0]

    def array(self, dtype, count: int, what: str) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        self.need(n, what)
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.off)
        self.off += n
        if self.copy:
            return a.copy()
        a.flags.writeable = False  # a view into the blob: the blob must not change through it
        return a

    def rows(self, count: int, what: str):
        """`count` bytes of K or V rows: an array (see `array`), or for a state file where they lie."""
        if self.path is None:
            return self.array(np.uint8, count, what)
        self.need(count, what)
        span = FileRows(self.path, self.off, count)
        self.off += count
        return span


@dataclass(frozen=True)
class FileRows:
    """`nbytes` bytes at `offset` of a state file, read when used (os.pread: nothing stays mapped)."""

    path: str
    offset: int
    nbytes: int

    def read(self) -> np.ndarray:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            out = np.empty(self.nbytes, np.uint8)
            view, got = memoryview(out), 0
            while got < self.nbytes:
                n = os.preadv(fd, [view[got:]], self.offset + got)
                if n <= 0:
                    raise StateFormatError(f"{self.path}: truncated state file (read {got} of {self.nbytes} "
                                           f"bytes at {self.offset})")
                got += n
            return out
        finally:
            os.close(fd)


class FileLayerKV(LazyLayerKV):
    """A layer of a state file (`parse_state_file`): its rows read from the file each time they are
    used, so a spilled context costs host memory one layer at a time."""

    def __init__(self, k_type: int, k: FileRows, k_row: int, v_type: int, v: FileRows, v_row: int,
                 n_cells: int, v_trans: bool) -> None:
        self.k_type, self.v_type, self.k_row, self.v_row, self.n_cells = k_type, v_type, k_row, v_row, n_cells
        self._k, self._v, self._trans = k, v, v_trans

    @property
    def k(self) -> np.ndarray:
        return self._k.read().reshape(self.n_cells, self.k_row)

    def v_dim_major(self) -> np.ndarray:
        el = GGML_TYPES[self.v_type][2]
        if self._trans:
            return self._v.read().reshape(self.v_row // el, self.n_cells, el)
        return self.v.reshape(self.n_cells, -1, el).transpose(1, 0, 2)

    @property
    def v(self) -> np.ndarray:
        if not self._trans:
            return self._v.read().reshape(self.n_cells, self.v_row)
        return np.ascontiguousarray(self.v_dim_major().transpose(1, 0, 2)).reshape(self.n_cells, self.v_row)


# llama_state_seq_save_file / load_file: u32 magic 'ggsq', u32 version, u32 n_tokens, tokens, then the blob
# as `llama_state_seq_get_data` writes it without its first 8 bytes (magic, seq_id)
SEQ_FILE_MAGIC, SEQ_FILE_VERSION = 0x67677371, 3


def parse_state_file(path: str | os.PathLike, *, has_ext: bool = False, n_blocks: int = 1) -> SeqState:
    """Parse a `llama_state_seq_save_file` file (no tokens) as `parse_state` parses a blob, with the K and V
    rows left in the file (`FileLayerKV`): only the headers and cell metadata are read now."""
    path = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 12:
            raise StateFormatError(f"{path}: not a llama.cpp sequence state file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            magic, version, n_tok = struct.unpack_from("<III", mm, 0)
            if magic != SEQ_FILE_MAGIC or version != SEQ_FILE_VERSION or n_tok:
                raise StateFormatError(f"{path}: not a llama.cpp sequence state file of this version (magic "
                                       f"{magic:#x}, version {version}, {n_tok} tokens)")
            r = _Reader(mm, copy=True, path=path, start=12)
            blocks = [_parse_block(r, has_ext, i) for i in range(n_blocks)]
            if r.off != len(r.buf):
                raise StateFormatError(f"{path}: {len(r.buf) - r.off} unexpected trailing bytes")
            r.buf.release()
    return SeqState(seq_id=0, blocks=blocks, has_ext=has_ext)


def parse_state(blob, *, has_ext: bool = False, n_blocks: int = 1, copy: bool = True) -> SeqState:
    """Parse a `llama_state_seq_get_data` blob (bytes or any buffer, e.g. a ctypes array). Raises
    StateFormatError on anything unexpected. copy=False: the K rows (and V rows unless transposed) are
    read-only views into `blob`, which they keep alive: no second copy of the cache (compaction)."""
    r = _Reader(blob, copy)
    magic = r.unpack("<I", "magic")
    if magic != MAGIC:
        raise StateFormatError(f"not a llama.cpp sequence state (magic {magic:#x}, expected {MAGIC:#x}); "
                               "it may come from another llama.cpp version")
    seq_id = r.unpack("<i", "seq_id")
    blocks = [_parse_block(r, has_ext, i) for i in range(n_blocks)]
    if r.off != len(r.buf):
        raise StateFormatError(f"KV state blob has {len(r.buf) - r.off} unexpected trailing bytes "
                               "(another llama.cpp version or model layout?)")
    return SeqState(seq_id=seq_id, blocks=blocks, has_ext=has_ext)


def _parse_block(r: _Reader, has_ext: bool, index: int) -> KVBlock:
    n_stream = r.unpack("<I", "n_stream")
    if n_stream != 1:
        raise StateFormatError(f"KV block {index} has {n_stream} streams; edgekv handles one sequence per "
                               "context (n_seq_max=1 or a unified cache)")
    n = r.unpack("<I", "cell_count")
    if n == 0:
        return KVBlock(pos=np.zeros(0, np.int32), seq_id=np.zeros(0, np.int32),
                       ext=np.zeros((0, 3), np.int32) if has_ext else None, v_trans=False, layers=[])
    width = 2 + (3 if has_ext else 0) + 1
    meta = r.array("<i4", n * width, "cell metadata").reshape(n, width)
    if (meta[:, 1] != 1).any():
        raise StateFormatError("KV cells shared by several sequences are not supported (n_seq_id != 1)")
    pos = meta[:, 0].astype(np.int32)
    ext = meta[:, 2:5].astype(np.int32) if has_ext else None
    seq = meta[:, -1].astype(np.int32)
    v_trans, n_layer = r.unpack("<II", "v_trans/n_layer")
    if v_trans not in (0, 1) or not 0 < n_layer <= 1024:
        raise StateFormatError(f"KV block {index} header not understood (v_trans={v_trans}, n_layer={n_layer})")
    ks = []
    for il in range(n_layer):
        k_type, k_row = r.unpack("<iQ", f"layer {il} K header")
        type_name(k_type)
        row_elements(k_type, k_row)
        k = r.rows(n * k_row, f"layer {il} K")
        ks.append((k_type, k if isinstance(k, FileRows) else k.reshape(n, k_row), k_row))
    layers = []
    for il in range(n_layer):
        k_type, k, k_row = ks[il]
        if not v_trans:
            v_type, v_row = r.unpack("<iQ", f"layer {il} V header")
            type_name(v_type)
            row_elements(v_type, v_row)
            v = r.rows(n * v_row, f"layer {il} V")
            if isinstance(v, FileRows):
                layers.append(FileLayerKV(k_type, k, k_row, v_type, v, v_row, n, False))
                continue
            v = v.reshape(n, v_row)
        else:
            v_type, el, n_embd_v = r.unpack("<iII", f"layer {il} V header")
            name, blck, size = GGML_TYPES.get(v_type, (None, 0, 0))
            if name is None or blck != 1 or el != size:
                raise StateFormatError(f"transposed V of type id {v_type} (element {el} B) is not supported")
            raw = r.rows(n_embd_v * n * el, f"layer {il} V")
            if isinstance(raw, FileRows):
                layers.append(FileLayerKV(k_type, k, k_row, v_type, raw, n_embd_v * el, n, True))
                continue
            raw = raw.reshape(n_embd_v, n, el)
            if not r.copy:  # left in the blob, transposed when read (one layer at a time)
                layers.append(TransposedLayerKV(k_type, k, v_type, raw))
                continue
            v = raw.transpose(1, 0, 2).reshape(n, n_embd_v * el).copy()
        layers.append(LayerKV(k_type, k, v_type, v))
    return KVBlock(pos=pos, seq_id=seq, ext=ext, v_trans=bool(v_trans), layers=layers)


def serialize_state(state: SeqState) -> bytes:
    """The exact inverse of `parse_state`."""
    return bytes(state_buffer(state))


def state_size(state: SeqState) -> int:
    """Bytes of the blob `state_buffer(state)` writes."""
    return 8 + sum(block_size(b.n_cells, b.n_layers, b.nbytes, state.has_ext) for b in state.blocks)


def block_size(n_cells: int, n_layers: int, kv_bytes: int, has_ext: bool) -> int:
    """Bytes a KV block of `n_cells` cells holding `kv_bytes` of K and V rows takes in a blob."""
    if not n_cells:
        return 8
    return 8 + n_cells * _cell_meta(has_ext) + 8 + 24 * n_layers + kv_bytes  # K "<iQ", V "<iQ" or "<iII"


def block_cells(size: int, n_layers: int, cell_bytes: int, has_ext: bool) -> int | None:
    """The cells of a KV block that takes `size` bytes in a blob (the inverse of `block_size`, each cell
    holding `cell_bytes` of K and V rows); None when no cell count gives that size."""
    if size == block_size(0, n_layers, 0, has_ext):
        return 0
    cells, left = divmod(size - block_size(1, n_layers, 0, has_ext) + _cell_meta(has_ext),
                         _cell_meta(has_ext) + cell_bytes)
    return cells if not left and cells > 0 else None


def _cell_meta(has_ext: bool) -> int:
    """A cell's metadata in a blob: pos, n_seq_id, [x, y, tok,] seq_id."""
    return 4 * (2 + (3 if has_ext else 0) + 1)


def state_buffer(state: SeqState) -> ctypes.Array:
    """`serialize_state` written straight into one ctypes buffer (what llama.cpp reads), with no
    intermediate bytes: the only copy of the new blob."""
    buf = (ctypes.c_uint8 * state_size(state))()
    out = np.frombuffer(buf, dtype=np.uint8)
    off = 0

    def put(a: np.ndarray) -> None:
        nonlocal off
        a = np.asarray(a)
        flat = out[off:off + a.nbytes]
        flat.view(a.dtype).reshape(a.shape)[...] = a  # one copy, transposes included
        off += a.nbytes

    def header(fmt: str, *vals) -> None:
        nonlocal off
        struct.pack_into(fmt, buf, off, *vals)
        off += struct.calcsize(fmt)

    header("<Ii", MAGIC, state.seq_id)
    _write_blocks(state, put, header)
    if off != len(buf):
        raise AssertionError(f"state_buffer wrote {off} of {len(buf)} bytes")
    return buf


def write_state_file(state: SeqState, path: str | os.PathLike) -> int:
    """`state` as `llama_state_seq_save_file` writes a sequence (no tokens), for `llama_state_seq_load_file`,
    written a layer at a time: a lazy state is never held whole. Returns the bytes written."""
    with open(path, "wb") as f:
        def put(a: np.ndarray) -> None:
            f.write(np.ascontiguousarray(a).data)

        def header(fmt: str, *vals) -> None:
            f.write(struct.pack(fmt, *vals))

        header("<III", SEQ_FILE_MAGIC, SEQ_FILE_VERSION, 0)
        _write_blocks(state, put, header)
        return f.tell()


def _write_blocks(state: SeqState, put, header) -> None:
    for b in state.blocks:
        header("<II", 1, b.n_cells)
        if b.n_cells == 0:
            continue
        meta = np.empty((b.n_cells, _cell_meta(state.has_ext) // 4), "<i4")
        meta[:, 0], meta[:, 1] = b.pos, 1
        if state.has_ext:
            if b.ext is None:
                raise ValueError("state has_ext but a block has no ext")
            meta[:, 2:5] = b.ext
        meta[:, -1] = b.seq_id
        put(meta)
        header("<II", int(b.v_trans), b.n_layers)
        for l in b.layers:  # `l.k` / `l.v` read once each: a LazyLayerKV makes one layer at a time
            header("<iQ", l.k_type, l.k_row)
            put(l.k)
        for l in b.layers:
            if not b.v_trans:
                header("<iQ", l.v_type, l.v_row)
                put(l.v)
            else:
                el = GGML_TYPES[l.v_type][2]
                header("<iII", l.v_type, el, l.v_row // el)
                put(l.v_dim_major())
