"""Plan -> fewer cells, with per-slot packing (docs/architecture.md, "Per-slot packing").

llama.cpp cells are shared by all layers and KV heads, but K is cached after RoPE, so a cell is only a
slot: for every (layer, KV head) we write that head's own selected token into the same slot. C slots
then give every head its own top-C at the memory of C cells.

- Protected tokens (non-candidates: system text, the question, the `pos_max` cell) are copied whole, at
  their true positions, in every layer.
- Slot labels: the C candidates chosen by the most (layer, head) rows, in position order, lend their
  position (and M-RoPE ext) to the slots. Under a causal mask a label only decides visibility, and every
  later token sees the whole span, so any increasing labels from the span are exact.
- Rows move as bytes whenever a head spans whole quantization blocks (always for f32/f16/bf16, and for
  q8_0/q4_0 with head_dim % 32 == 0): selection is lossless for every cache type. Merged slots are
  computed in float32 and converted back (re-quantizing q8_0/q4_0 blocks).
"""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from edgekv.kv.codec import KVBlock, LazyLayerKV
from edgekv.kv.dtypes import bytes_per_head, from_float, to_float
from edgekv.plan import Plan


def slot_labels(plan: Plan, candidates: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[C] token indices that label the slots: the most-chosen candidates, in position order."""
    T = candidates.shape[0]
    votes = np.bincount(plan.keep.ravel(), minlength=T).astype(np.float64)
    votes[~candidates] = -1.0
    # Most votes first; ties to the earlier token. Stable sort keeps it deterministic.
    chosen = np.argsort(-votes, kind="stable")[: plan.n_slots]
    return chosen[np.lexsort((chosen, positions[chosen]))]


def pack_block(block: KVBlock, plan: Plan, candidates: np.ndarray, n_kv_heads: int,
               merged: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[KVBlock, np.ndarray]:
    """The block with candidates replaced by `plan.n_slots` packed slots, and the source cell of every
    new cell (a protected cell itself, or the candidate that labels a slot).

    block:      the cells the plan was made on, in the view's token order.
    candidates: [T] bool, the view's candidates.
    merged:     optional (K, V) float32 [L, H_kv, C, d] slot contents (when the plan merges tokens).
    """
    T = block.n_cells
    if candidates.shape != (T,) or plan.keep.shape[0] != block.n_layers:
        raise ValueError("plan, candidates and block do not describe the same cells")
    labels = slot_labels(plan, candidates, block.pos)
    protected = np.flatnonzero(~candidates)
    src = np.concatenate([protected, labels])
    is_slot = np.concatenate([np.zeros(len(protected), bool), np.ones(len(labels), bool)])
    order = np.lexsort((src, block.pos[src]))     # new cells sorted by position, then token index
    src, is_slot = src[order], is_slot[order]
    slot_rows = np.flatnonzero(is_slot)           # row of slot s in the new block (labels are sorted)

    layers = [PackedLayerKV(old, src, plan.keep[il].T, slot_rows, n_kv_heads,
                            None if merged is None else (merged[0][il], merged[1][il]))
              for il, old in enumerate(block.layers)]
    out = replace(block, pos=block.pos[src], seq_id=block.seq_id[src],
                  ext=None if block.ext is None else block.ext[src], layers=layers)
    if T and out.n_cells and out.pos.max() != block.pos.max():
        raise AssertionError("the pos_max cell was not kept")
    return out, src


class PackedLayerKV(LazyLayerKV):
    """One packed layer, made when read from the old layer (protected rows copied, slots filled), so
    writing the new blob holds one layer's rows at a time, not a second copy of the cache."""

    def __init__(self, old, src: np.ndarray, keep: np.ndarray, slot_rows: np.ndarray, n_heads: int,
                 merged: tuple[np.ndarray, np.ndarray] | None) -> None:
        self._old, self._src, self._keep, self._slots, self._heads = old, src, keep, slot_rows, n_heads
        self._merged = merged                      # [H_kv, C, d] K and V of this layer's slots
        self.k_type, self.v_type, self.k_row, self.v_row = old.k_type, old.v_type, old.k_row, old.v_row
        self.n_cells = len(src)

    @property
    def k(self) -> np.ndarray:
        old = self._old.k
        return _fill_slots(old[self._src], old, self.k_type, self._keep, self._slots, self._heads,
                           None if self._merged is None else self._merged[0])

    @property
    def v(self) -> np.ndarray:
        old = self._old.v                          # a transposed blob's V: this layer, cell-major
        return _fill_slots(old[self._src], old, self.v_type, self._keep, self._slots, self._heads,
                           None if self._merged is None else self._merged[1])


def _fill_slots(new: np.ndarray, old: np.ndarray, type_id: int, keep: np.ndarray, slot_rows: np.ndarray,
                n_heads: int, merged: np.ndarray | None) -> np.ndarray:
    """Write each head's selected token (or merged value) into the slot rows of `new` (uint8 rows)."""
    n_new, row_bytes = new.shape
    C = len(slot_rows)
    if C == 0:
        return new
    hb = bytes_per_head(type_id, row_bytes, n_heads)
    if merged is None and hb is not None:
        heads = np.arange(n_heads)[None, :]
        view = new.reshape(n_new, n_heads, hb)
        view[slot_rows[:, None], heads] = old.reshape(old.shape[0], n_heads, hb)[keep, heads]
        return new
    # Float path: merged values, or heads that split a quantization block.
    if merged is not None:
        rows = merged.transpose(1, 0, 2).reshape(C, -1)          # [C, H_kv * d]
    else:
        f = to_float(old, type_id)
        d = f.shape[1] // n_heads
        heads = np.arange(n_heads)[None, :]
        rows = f.reshape(-1, n_heads, d)[keep, heads].reshape(C, -1)
    new[slot_rows] = from_float(rows, type_id)
    return new


def layer_floats(block: KVBlock, n_kv_heads: int, cells: np.ndarray | None = None, *, keys: bool = True,
                 values: bool = True) -> tuple[np.ndarray | None, np.ndarray | None]:
    """K and V of the block as float32 [L, H_kv, T, d] (the methods' view). cells: only these cells
    (an index array, in that order; T = len(cells)); keys/values=False: that one is None. Each layer is
    converted alone into the preallocated result, so the float copy is the only one held."""
    idx = None if cells is None else np.asarray(cells, dtype=np.int64)
    out = []
    for want, rows_of, type_of in ((keys, lambda l: l.k, lambda l: l.k_type),
                                   (values, lambda l: l.v, lambda l: l.v_type)):
        if not want:
            out.append(None)
            continue
        acc = None
        for il, layer in enumerate(block.layers):
            rows = rows_of(layer)
            f = to_float(rows if idx is None else rows[idx], type_of(layer))   # [T, H_kv * d]
            f = f.reshape(f.shape[0], n_kv_heads, -1).transpose(1, 0, 2)
            if acc is None:
                acc = np.empty((block.n_layers,) + f.shape, dtype=np.float32)
            acc[il] = f
        if acc is None:
            acc = np.zeros((0, n_kv_heads, 0 if idx is None else len(idx), 0), np.float32)
        out.append(acc)
    return out[0], out[1]


class LayerFloats(NDArrayOperatorsMixin):
    """K or V of a block as a float32 [L, H_kv, T, d] array made one layer at a time, when a method
    indexes it by layer (`x[layer]`, `x[layer, head]`: the window attention, per-layer loops). Only the
    last few layers are held, so planning over a big block (recall's universe of every stored cell)
    holds about one layer of floats, not the block. Anything else (`np.asarray(x)`, a ufunc, a slice over
    layers) makes the whole array once and keeps it: the same numbers as `layer_floats`, the memory of
    before."""

    ndim = 4
    dtype = np.dtype(np.float32)
    _HELD = 3     # layers kept (planning threads work on neighbouring layers)
    _HELD_HEADS = 2   # heads kept (the window attention reads each (layer, head) once, a thread each)

    def __init__(self, block: KVBlock, n_kv_heads: int, cells: np.ndarray | None, which: str) -> None:
        self._block, self._which = block, which
        self._cells = None if cells is None else np.asarray(cells, dtype=np.int64)
        layer = block.layers[0]
        width = layer.n_embd_k if which == "k" else layer.n_embd_v
        T = block.n_cells if cells is None else len(self._cells)
        self.shape = (block.n_layers, n_kv_heads, T, width // n_kv_heads)
        self._held: dict[int, np.ndarray] = {}
        self._head_floats: dict[tuple[int, int], np.ndarray] = {}   # (layer, head) -> [T, d], see head()
        self._rows_at: tuple[int, np.ndarray, int] | None = None    # (layer, its bytes, type), see head()
        self._full: np.ndarray | None = None
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def layer(self, il: int) -> np.ndarray:
        """[H_kv, T, d] float32 of layer il (read-only)."""
        il = int(il) + (self.shape[0] if il < 0 else 0)
        if self._full is not None:
            return self._full[il]
        with self._lock:
            return self._held_layer(il)

    def _held_layer(self, il: int) -> np.ndarray:
        got = self._held.get(il)
        if got is None:
            got = np.ascontiguousarray(self._convert(il))
            got.flags.writeable = False
            if len(self._held) >= self._HELD:
                self._held.pop(next(iter(self._held)))
            self._held[il] = got
        return got

    def head(self, il: int, h: int) -> np.ndarray:
        """[T, d] float32 of KV head h in layer il (read-only): made from that head's bytes alone when a
        head spans whole quantization blocks (the window attention reads one head at a time), so over a
        big block this holds a few heads of floats, not a few layers."""
        il = int(il) + (self.shape[0] if il < 0 else 0)
        h = int(h) + (self.shape[1] if h < 0 else 0)
        if self._full is not None:
            return self._full[il, h]
        with self._lock:
            if il in self._held:
                return self._held[il][h]
            got = self._head_floats.get((il, h))
            if got is None:
                layer = self._block.layers[il]
                t, width = (layer.k_type, layer.k_row) if self._which == "k" else (layer.v_type, layer.v_row)
                per = bytes_per_head(t, width, self.shape[1])
                if per is None:
                    return self._held_layer(il)[h]
                if self._rows_at is None or self._rows_at[0] != il:   # the layer's heads are read in turn
                    self._rows_at = (il, *self._layer_rows(il))
                rows = self._rows_at[1]
                T, d = self.shape[2:]
                got = np.empty((T, d), np.float32)
                for a in range(0, T, self._ROWS):
                    part = to_float(np.ascontiguousarray(rows[a:a + self._ROWS, h * per:(h + 1) * per]), t)
                    got[a:a + part.shape[0]] = part
                got.flags.writeable = False
                if len(self._head_floats) >= self._HELD_HEADS:
                    self._head_floats.pop(next(iter(self._head_floats)))
                self._head_floats[(il, h)] = got
            return got

    def _layer_rows(self, il: int) -> tuple[np.ndarray, int]:
        """Layer il's K or V bytes of the block's cells, and their ggml type."""
        layer = self._block.layers[il]
        rows, t = (layer.k, layer.k_type) if self._which == "k" else (layer.v, layer.v_type)
        return (rows if self._cells is None else rows[self._cells]), t

    def release(self) -> None:
        """Drop the floats and bytes held (a later read makes them again)."""
        with self._lock:
            self._held, self._head_floats, self._rows_at = {}, {}, None

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.layer(key)
        if isinstance(key, tuple) and len(key) >= 2 and all(isinstance(k, (int, np.integer)) for k in key[:2]):
            return self.head(key[0], key[1])[key[2:]]
        if isinstance(key, tuple) and key and isinstance(key[0], (int, np.integer)):
            return self.layer(key[0])[key[1:]]
        return self.__array__()[key]

    def __array__(self, dtype=None, copy=None):
        if self._full is None:
            with self._lock:
                if self._full is None:
                    full = np.empty(self.shape, np.float32)
                    for il in range(self.shape[0]):
                        full[il] = self._held.get(il) if il in self._held else self._convert(il)
                    full.flags.writeable = False
                    self._full, self._held, self._head_floats, self._rows_at = full, {}, {}, None
        return self._full if dtype is None else self._full.astype(dtype)

    _ROWS = 1024  # rows converted at once: a quantized type's dequantization makes several temporaries

    def _convert(self, il: int) -> np.ndarray:
        rows, t = self._layer_rows(il)
        H, T, d = self.shape[1:]
        out = np.empty((H, T, d), np.float32)        # [H_kv, T, d], contiguous: filled a slice of rows at a time
        for a in range(0, T, self._ROWS):
            f = to_float(rows[a:a + self._ROWS], t)
            out[:, a:a + f.shape[0]] = f.reshape(f.shape[0], H, d).transpose(1, 0, 2)
        return out

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(np.asarray(x) if isinstance(x, LayerFloats) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.__array__(), name)     # .T, .reshape, .sum, ... on the whole array
