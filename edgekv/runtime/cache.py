"""The compressed cache: one llama.cpp sequence and the bookkeeping llama.cpp does not keep for us.

After a compaction the cell count is not the position count, so we track the logical position of the
next token (`n_past`, from chunks' n_pos for M-RoPE) and, per cell in blob order, its kind (protected
text, media waiting for compaction, packed slots) and media index. Compaction reads the sequence's state
blob, lets a method plan, packs the plan (`edgekv.kv.packer`) and writes the blob back. Streamed media
compact the last chunk alone (`compact_chunk`): sequence 1 of the context (one cell pool with seq 0)
marks the chunk's cells, so only they are read and rewritten.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from edgekv.errors import Cancelled, CompactionError, ContextOverflowError, EdgeKVError, StateFormatError
from edgekv.kv.codec import SeqState, parse_state, state_buffer
from edgekv.kv.packer import layer_floats, pack_block
from edgekv.methods import KVView, Method, Span
from edgekv.methods.parallel import planning_threads
from edgekv.runtime import lib
from edgekv.runtime.lib import llama_cpp
from edgekv.runtime.model import Model

PROTECTED, PENDING, PACKED = 0, 1, 2
SCRATCH_SEQ = 1  # marks one media chunk for compact_chunk (the context has 2 sequences, one cell pool)
CANCELLED_MESSAGE = "cancelled; the conversation is as it was before this turn"


@dataclass
class CompactionReport:
    method: str
    budget_cells: int          # cells per (layer, head) the user's budget asked for
    n_candidates: int          # compressible cells before
    cells_before: int
    cells_after: int
    bytes_before: int          # K+V bytes of the whole sequence (all cache blocks)
    bytes_after: int
    seconds: float             # read + plan + pack + write back
    plan_seconds: float
    nominal_mean: float
    nominal_max: int
    merged: bool
    window: int                # captured query rows used (0 = query-agnostic)
    info: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


@dataclass(frozen=True)
class CacheMarks:
    """The bookkeeping of a CompressedCache at one moment (not the cells' bytes)."""

    n_past: int
    kind: np.ndarray
    media: np.ndarray
    n_media: int
    window_q: np.ndarray | None
    window_rows: int
    logits: np.ndarray | None
    after_media: bool = False


class CompressedCache:
    """Sequence 0 of the model's context, its cells' kinds and positions, decode and compaction."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.plan_as_chunk = False   # see compact()
        self.batch = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        self.reset()

    # --- bookkeeping ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the sequence and forget every cell."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.model.ctx), True)
        self.n_past = 0
        self.kind = np.zeros(0, np.int8)        # per cell, blob order: PROTECTED / PENDING / PACKED
        self.media = np.zeros(0, np.int32)      # per cell: media index or -1
        self.n_media = 0
        self.window_q: np.ndarray | None = None  # captured queries of the last prompt tokens [L, H, W, d]
        self.window_rows = 0
        self.logits: np.ndarray | None = None    # after the last decoded token
        self.logits_after_media = False          # True: the prompt ends with media (no logits there)
        self.last_chunk: tuple[int, int, int, int] | None = None  # (pos lo, pos hi, cell lo, cell hi)

    @property
    def n_cells(self) -> int:
        return int(self.kind.shape[0])

    def marks(self) -> CacheMarks:
        return CacheMarks(self.n_past, self.kind.copy(), self.media.copy(), self.n_media, self.window_q,
                          self.window_rows, self.logits, self.logits_after_media)

    def set_marks(self, m: CacheMarks) -> None:
        self.n_past, self.kind, self.media, self.n_media = m.n_past, m.kind.copy(), m.media.copy(), m.n_media
        self.window_q, self.window_rows, self.logits = m.window_q, m.window_rows, m.logits
        self.logits_after_media = m.after_media
        self.last_chunk = None

    def add_cells(self, n: int, kind: int, media: int = -1) -> None:
        self.kind = np.concatenate([self.kind, np.full(n, kind, np.int8)])
        self.media = np.concatenate([self.media, np.full(n, media, np.int32)])

    def drop_tail(self, n_past: int, n_cells: int) -> None:
        """Remove every cell at position >= n_past: the last cells, when nothing was compacted since."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.model.ctx), 0, n_past, -1)
        self.n_past = n_past
        self.last_chunk = None
        self.kind, self.media = self.kind[:n_cells], self.media[:n_cells]

    def swa_state(self) -> bytes:
        """The sliding-window block alone (LLAMA_STATE_SEQ_FLAGS_SWA_ONLY: the cells the current last
        position can still see), to put back after a rollback. State blobs leave out the cells that are
        masked for the last position, so a blob read later in a turn lacks what the turn's start needs."""
        ctx, flags = self.model.ctx, llama_cpp.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY
        n = llama_cpp.llama_state_seq_get_size_ext(ctx, 0, flags)
        buf = (ctypes.c_uint8 * n)()
        if llama_cpp.llama_state_seq_get_data_ext(ctx, buf, n, 0, flags) != n:
            raise StateFormatError("llama.cpp returned a short sliding-window state")
        return bytes(buf)

    def set_swa_state(self, blob: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY
        return llama_cpp.llama_state_seq_set_data_ext(self.model.ctx, buf, len(blob), 0, flags) == len(blob)

    def check_room(self, n: int) -> None:
        if self.n_cells + n > self.model.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {n} more cells but only {self.model.n_ctx - self.n_cells} of "
                f"{self.model.n_ctx} are free; raise -c/--ctx-size or lower the image size or budget")

    # --- the state blob -------------------------------------------------------------------------
    def state_blob(self) -> bytes:
        return bytes(self.state_buffer())

    def state_buffer(self, seq: int = 0) -> ctypes.Array:
        """The sequence's state blob in the ctypes buffer llama.cpp wrote it to (no bytes copy)."""
        ctx = self.model.ctx
        n = llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        got = llama_cpp.llama_state_seq_get_data(ctx, buf, n, seq)
        if got != n:
            raise StateFormatError(f"llama.cpp returned {got} of {n} state bytes")
        return buf

    def set_state(self, blob: bytes | ctypes.Array) -> bool:
        """Write a state blob back: a ctypes buffer as it is, bytes without a copy (llama.cpp only reads)."""
        n = len(blob)
        if isinstance(blob, ctypes.Array):
            ptr = ctypes.cast(blob, ctypes.POINTER(ctypes.c_uint8))
        else:
            blob = bytes(blob)  # a no-op for bytes; the pointer below must point at immutable memory
            ptr = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))
        return llama_cpp.llama_state_seq_set_data(self.model.ctx, ptr, n, 0) == n

    def parse(self, blob: bytes | ctypes.Array, copy: bool = True) -> SeqState:
        lay = self.model.layout
        state = parse_state(blob, has_ext=lay.mrope, n_blocks=2 if lay.iswa else 1, copy=copy)
        base = state.blocks[0]
        if base.n_cells:
            want = len(lay.global_layers)
            if base.n_layers != want:
                raise StateFormatError(f"the cache holds {base.n_layers} layers where {lay.arch} should have "
                                       f"{want}: unsupported model layout")
            for layer in base.layers:
                if layer.n_embd_k != lay.n_head_kv * lay.head_dim or layer.n_embd_v != lay.n_head_kv * lay.head_dim_v:
                    raise StateFormatError(f"per-layer KV widths differ from {lay.n_head_kv} heads x "
                                           f"{lay.head_dim}: unsupported model layout")
        return state

    def nbytes(self) -> int:
        """K+V bytes the sequence holds in all cache blocks."""
        return self.parse(self.state_buffer(), copy=False).nbytes if self.n_cells else 0

    # --- decode ---------------------------------------------------------------------------------
    def decode(self, tokens: list[int], logits: Literal["last", "all", "none"],
               capture_rows: int = 0) -> np.ndarray | None:
        """One llama_decode of at most n_batch tokens at positions n_past.. (cells not recorded here:
        the caller adds them with their kind). Raises Cancelled when the abort flag stopped it."""
        b = self.batch
        n = len(tokens)
        if n > self.model.n_batch:  # llama_batch_init sized the arrays for n_batch tokens
            raise EdgeKVError(f"internal: {n} tokens in one batch of {self.model.n_batch}")
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits == "all" or (logits == "last" and i == n - 1)
        b.n_tokens = n
        cap = self.model.capture
        if capture_rows and cap is not None:
            cap.arm(capture_rows)
        try:
            rc = llama_cpp.llama_decode(self.model.ctx, b)
        finally:
            if cap is not None:
                cap.disarm()
        if rc != 0:
            if rc == 2:  # the abort callback (Session.cancel); this batch's cells were dropped
                raise Cancelled(CANCELLED_MESSAGE)
            if rc == 1:
                raise ContextOverflowError("llama.cpp found no free KV slot for the batch (context full)")
            raise EdgeKVError(f"llama_decode failed with code {rc}:\n{lib.recent_log()}")
        self.n_past += n
        if logits == "none":
            return None
        rows = range(n) if logits == "all" else [n - 1]
        out = np.stack([self.logits_row(i) for i in rows])
        self.logits = out[-1]
        self.logits_after_media = False
        return out

    def current_logits(self) -> np.ndarray:
        """The logits to sample the next token from, or a clear error when there are none."""
        if self.logits is None:
            if self.logits_after_media:
                raise EdgeKVError("the prompt ends with an image: llama.cpp computes no logits for image "
                                  "embeddings, so there is nothing to sample from; append text after it (the "
                                  "question; chat() always does)")
            raise EdgeKVError("no logits yet: append a prompt first")
        return self.logits

    def logits_row(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.model.ctx, i)
        if not ptr:
            raise EdgeKVError(f"llama.cpp has no logits for row {i}:\n{lib.recent_log()}")
        return np.ctypeslib.as_array(ptr, (self.model.n_vocab,)).copy()

    # --- compaction -----------------------------------------------------------------------------
    def candidates(self, compress: Literal["media", "all"]) -> np.ndarray:
        """[cells] bool: what the next compaction may evict."""
        cand = self.kind == PENDING
        if compress == "all":
            cand = self.kind != PACKED
            cand[:1] = False
        if self.window_rows:
            cand[self.n_cells - self.window_rows:] = False
        if self.n_cells:
            cand[-1] = False  # the pos_max cell must survive, or the next decode is refused
        return cand

    def spans(self) -> tuple[Span, ...]:
        spans, start = [], 0
        key = np.where(self.kind == PACKED, -2, self.media)
        for i in range(1, self.n_cells + 1):
            if i == self.n_cells or key[i] != key[start]:
                m = int(self.media[start])
                spans.append(Span(start, i, "media" if m >= 0 else "text", m))
                start = i
        return tuple(spans)

    def compact(self, meth: Method, cand: np.ndarray, budget_cells: int, *, use_queries: bool, seed: int,
                label_suffix: str = "", on_blob: Callable[[ctypes.Array], None] | None = None,
                cap: bool = False) -> CompactionReport:
        """Plan with `meth` over the candidate cells and write the packed cache back. On any failure the
        original cache is restored and CompactionError raised. on_blob sees the blob before the rewrite.
        cap: keep at most budget_cells slots (Plan.capped), for a context sized for the budget.
        With `plan_as_chunk` set (benchmarks), a method that can plans on the candidates alone with the
        window outside the view, as compact_chunk does, so that planning is measured where compact_chunk
        cannot run (iSWA models)."""
        t0 = time.perf_counter()
        # Host memory (scripts/mem_compaction.py): the blob llama.cpp writes is the only copy of the
        # cache read back (parsed as views into it); only the cells and arrays the method reads become
        # float32; the packed blob is written straight into the buffer llama.cpp reads.
        blob = self.state_buffer()
        if on_blob is not None:
            on_blob(blob)
        state = self.parse(blob, copy=False)
        base = state.blocks[0]
        if base.n_cells != self.n_cells:
            raise StateFormatError(f"the cache holds {base.n_cells} cells where the session tracked {self.n_cells}")
        lay = self.model.layout
        queries = self.window_q if use_queries else None
        label = meth.name
        if getattr(meth, "resolve", None):  # `auto`: picks by regime (query window or not)
            meth = meth.resolve(_shape_view(base, lay.n_head_kv, cand, queries))
            label = f"auto -> {meth.name}"
        label += label_suffix
        if meth.needs_queries and queries is None:
            raise EdgeKVError(f"method {meth.name!r} needs the question's queries, but none were captured "
                              "(flash attention capture off, or no text after the media): use "
                              "--method flashcache or --method auto")
        window = 0 if queries is None else int(queries.shape[2])  # captured rows (the report's)
        as_chunk = self.plan_as_chunk and meth.plans_on_chunk
        view, cells = method_view(meth, base, lay.n_head_kv, cand, self.spans(), queries, lay.attn_scale, seed,
                                  rope=(lay.rope_base, lay.rope_neox), window_outside=as_chunk,
                                  key_rotation=self.model.rotation.key_matrix(lay.head_dim))
        t1 = time.perf_counter()
        with planning_threads(self.model.threads):
            plan = (meth.plan(view, budget_cells) if budget_cells < view.n_candidates or meth.name == "full"
                    else None)
        plan_s = time.perf_counter() - t1
        if plan is not None and cap:
            plan = plan.capped(budget_cells)
        if plan is None:  # budget covers everything: keep the cells as they are
            self.kind[cand] = PACKED
            return _report(label, budget_cells, cand, state, state, t0, plan_s, None, window)
        plan, merged = _cells_and_merges(meth, view, cells, plan, base, lay.n_head_kv)
        del view
        new_base, src = pack_block(base, plan, cand, lay.n_head_kv, merged)
        new_state = SeqState(state.seq_id, [new_base] + state.blocks[1:], state.has_ext)
        if not self.set_state(state_buffer(new_state)):
            restored = self.set_state(blob)
            raise CompactionError("llama.cpp refused the compacted cache"
                                  + ("; the original cache was restored" if restored
                                     else " AND the original could not be restored: call clear()")
                                  + f":\n{lib.recent_log()}")
        # Bookkeeping follows the packer's cell order: protected cells in place, slots marked PACKED.
        self.kind = np.where(cand[src], PACKED, self.kind[src]).astype(np.int8)
        self.media = self.media[src]
        return _report(label, budget_cells, cand, state, new_state, t0, plan_s, plan, window)

    def note_chunk(self, p0: int, p1: int, n: int) -> None:
        """The media chunk just decoded at positions [p0, p1) is the last n cells."""
        self.last_chunk = (p0, p1, self.n_cells - n, self.n_cells)

    def chunk_range(self, cand: np.ndarray) -> tuple[int, int, int, int] | None:
        """(pos lo, pos hi, cell lo, cell hi) of the last media chunk when the candidates are that chunk
        and nothing else (its last cell, the pos_max cell, excluded), with only text (a probe) after it:
        then compact_chunk can rewrite it alone. None: use compact()."""
        if self.last_chunk is None or self.model.layout.iswa:  # iSWA: seq ops would touch the SWA block
            return None
        p0, p1, i0, i1 = self.last_chunk
        idx = np.flatnonzero(cand)
        if (i1 - i0 < 2 or i1 > self.n_cells or idx.size != i1 - i0 - 1 or idx[0] != i0 or idx[-1] != i1 - 2
                or (self.kind[i1:] != PROTECTED).any()):
            return None
        return p0, p1, i0, i1

    def compact_chunk(self, meth: Method, chunk: tuple[int, int, int, int], budget_cells: int, *,
                      use_queries: bool, seed: int, label_suffix: str = "") -> CompactionReport | None:
        """Compact the last media chunk alone, without reading the rest of the cache (README,
        Video): mark its cells with the scratch sequence (seq_cp, no copy), read that sequence's state (the
        chunk's bytes only), plan on it, drop the chunk from seq 0 and write the packed cells back through
        the scratch sequence. llama.cpp places restored cells from the freed chunk's first cell on, so the
        cells stay in position order (blob order = bookkeeping order). Host memory is one chunk, not the
        cache. Returns None (nothing changed) when the method cannot plan on a chunk view; on a failure
        after the chunk left seq 0, the chunk's own bytes are written back and CompactionError raised."""
        t0 = time.perf_counter()
        lay = self.model.layout
        queries = self.window_q if use_queries else None
        label = meth.name
        if getattr(meth, "resolve", None):
            meth = meth.resolve(_QueriesOnly(queries))
            label = f"auto -> {meth.name}"
        if not meth.plans_on_chunk or (meth.needs_queries and queries is None):
            return None
        label += label_suffix
        p0, p1, i0, i1 = chunk
        mem = llama_cpp.llama_get_memory(self.model.ctx)
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)   # nothing left over from an interrupted one
        llama_cpp.llama_memory_seq_cp(mem, 0, SCRATCH_SEQ, p0, p1)
        try:
            blob = self.state_buffer(SCRATCH_SEQ)
            state = self.parse(blob, copy=False)
        except BaseException:
            llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)
            raise
        base = state.blocks[0]
        n = i1 - i0
        if base.n_cells != n or len(state.blocks) != 1:  # not the chunk we tracked: the whole-cache path
            llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)
            return None
        try:
            cand = np.ones(n, bool)
            cand[-1] = False            # the pos_max cell: copied whole
            spans = (Span(0, n, "media", int(self.media[i0])),)
            window = 0 if queries is None else int(queries.shape[2])
            view, cells = method_view(meth, base, lay.n_head_kv, cand, spans, queries, lay.attn_scale, seed,
                                      rope=(lay.rope_base, lay.rope_neox), window_outside=True,
                                      key_rotation=self.model.rotation.key_matrix(lay.head_dim))
            t1 = time.perf_counter()
            slots = max(1, budget_cells - 1)   # + the pos_max cell = the budget
            with planning_threads(self.model.threads):
                plan = meth.plan(view, slots) if slots < view.n_candidates else None
            if plan is not None:   # the context is sized for the budget: never more cells than it
                plan = plan.capped(slots)
            plan_s = time.perf_counter() - t1
            if plan is None:
                llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)
                self.kind[i0:i1] = PACKED
                return _chunk_report(label, budget_cells, n, self.n_cells, self.n_cells, lay, self.model,
                                     t0, plan_s, None, window)
            plan, merged = _cells_and_merges(meth, view, cells, plan, base, lay.n_head_kv)
            del view
            new_base, src = pack_block(base, plan, cand, lay.n_head_kv, merged)
            new_blob = state_buffer(SeqState(SCRATCH_SEQ, [new_base], state.has_ext))
        except BaseException:
            llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)
            raise
        # The chunk leaves seq 0 (its cells stay held by the scratch sequence); set_data frees them and
        # places the packed cells from the first freed one on; then they move back to seq 0.
        llama_cpp.llama_memory_seq_rm(mem, 0, p0, p1)
        ok = self._set_seq(new_blob, SCRATCH_SEQ)
        if not ok:
            log = lib.recent_log()
            restored = self._set_seq(blob, SCRATCH_SEQ)
            if restored:
                llama_cpp.llama_memory_seq_cp(mem, SCRATCH_SEQ, 0, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)
            raise CompactionError("llama.cpp refused the compacted chunk"
                                  + ("; the original chunk was restored" if restored
                                     else " AND the original chunk could not be restored: call clear()")
                                  + f":\n{log}")
        llama_cpp.llama_memory_seq_cp(mem, SCRATCH_SEQ, 0, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)
        before = self.n_cells
        # Every cell of the chunk is settled, its last (pos_max) cell included: later chunks do not
        # reconsider it, so the next chunk is again the only candidates (chunk_range).
        self.kind = np.concatenate([self.kind[:i0], np.full(len(src), PACKED, np.int8), self.kind[i1:]])
        self.media = np.concatenate([self.media[:i0], self.media[i0:i1][src], self.media[i1:]])
        self.last_chunk = None
        return _chunk_report(label, budget_cells, n - 1, before, self.n_cells, lay, self.model, t0, plan_s,
                             plan, window, chunk_cells=n)

    def _set_seq(self, blob: ctypes.Array, seq: int) -> bool:
        ptr = ctypes.cast(blob, ctypes.POINTER(ctypes.c_uint8))
        return llama_cpp.llama_state_seq_set_data(self.model.ctx, ptr, len(blob), seq) == len(blob)

    def free(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


def _shape_view(base, n_kv_heads: int, cand: np.ndarray, queries) -> KVView:
    """A view with the cache's shapes but no K/V bytes (zero-stride placeholders): enough for `auto` to
    pick its regime."""
    shape = (base.n_layers, n_kv_heads, base.n_cells, base.layers[0].n_embd_k // n_kv_heads)
    empty = np.broadcast_to(np.float32(0), shape)
    return KVView(keys=empty, values=empty, candidates=cand, queries=queries)


def method_view(meth: Method, base, n_kv_heads: int, cand: np.ndarray, spans: tuple[Span, ...], queries,
                scale: float, seed: int, rope: tuple[float, bool] | None = None, window_outside: bool = False,
                key_rotation: np.ndarray | None = None) -> tuple[KVView, np.ndarray | None]:
    """The view `meth` plans on, converting to float32 only what it reads (Method.view_cells,
    reads_keys, reads_values), and the cells it covers (None: all, in order). window_outside: a view of
    the candidates alone, with the window's queries (as compact_chunk plans). key_rotation: llama.cpp's
    rotation of a quantized K cache (KVView.key_rotation)."""
    cells = np.flatnonzero(cand) if meth.view_cells == "candidates" or window_outside else None
    K, V = layer_floats(base, n_kv_heads, cells, keys=meth.reads_keys, values=meth.reads_values)
    T = base.n_cells if cells is None else len(cells)
    shape = (base.n_layers, n_kv_heads, T, base.layers[0].n_embd_k // n_kv_heads)
    empty = np.broadcast_to(np.float32(0), shape)
    K = empty if K is None else K
    V = empty if V is None else V
    positions = base.pos.astype(np.int64)
    extra = {} if rope is None else dict(rope_base=rope[0], rope_neox=rope[1])  # `expected` un-rotates queries
    extra["key_rotation"] = key_rotation
    if window_outside:  # a chunk view: the window lies after all of it and stays with any sub-view
        extra["window_outside"] = True
    if cells is None:
        return KVView(keys=K, values=V, candidates=cand, spans=spans, queries=queries, scale=scale,
                      positions=positions, seed=seed, **extra), None
    # Spans restricted to the candidates, renumbered; the query window is not part of this view.
    rank = np.cumsum(cand) - 1
    sub = tuple(Span(int(rank[s.start] + (not cand[s.start])), int(rank[s.stop - 1]) + 1, s.kind, s.media_index)
                for s in spans if cand[s.start:s.stop].any())
    return KVView(keys=K, values=V, candidates=np.ones(T, bool), spans=sub,
                  queries=queries if window_outside else None, scale=scale,
                  positions=positions[cells], seed=seed, **extra), cells


def _cells_and_merges(meth: Method, view: KVView, cells: np.ndarray | None, plan, base, n_kv_heads: int):
    """The plan in cell indices (it was made on a view of `cells`, or of all cells) and the merged slots'
    float32 K and V when it merges (None otherwise)."""
    if cells is not None:  # a view of the candidates alone: its token indices -> cell indices
        plan = _plan_to_cells(plan, cells, base.n_cells)
    if plan.merge_to is None:
        return plan, None
    from edgekv.methods.merge import merged_kv

    if cells is not None or not (meth.reads_keys and meth.reads_values):
        K, V = layer_floats(base, n_kv_heads)
    else:
        K, V = view.keys, view.values
    return plan, merged_kv(K, V, plan)


def _plan_to_cells(plan, cells: np.ndarray, n_cells: int):
    """A plan made on a view of `cells` only, with its token indices mapped to cell indices."""
    from edgekv.plan import Plan

    merge_to = merge_weight = None
    if plan.merge_to is not None:
        L, H, _ = plan.merge_to.shape
        merge_to = np.full((L, H, n_cells), -1, np.int64)
        merge_weight = np.zeros((L, H, n_cells), np.float32)
        merge_to[..., cells] = plan.merge_to
        merge_weight[..., cells] = plan.merge_weight
    return Plan(keep=cells[plan.keep], nominal=plan.nominal, merge_to=merge_to, merge_weight=merge_weight,
                info=plan.info)


class _QueriesOnly:
    """What `auto` looks at to pick its regime: whether a window was captured."""

    def __init__(self, queries) -> None:
        self.queries = queries


def _chunk_report(name, budget_cells, n_candidates, cells_before, cells_after, lay, model, t0, plan_s, plan,
                  window, chunk_cells: int = 0) -> CompactionReport:
    per_cell = model.cell_bytes
    r = CompactionReport(
        method=name, budget_cells=budget_cells, n_candidates=n_candidates, cells_before=cells_before,
        cells_after=cells_after, bytes_before=cells_before * per_cell, bytes_after=cells_after * per_cell,
        seconds=time.perf_counter() - t0, plan_seconds=plan_s,
        nominal_mean=float(plan.nominal.mean()) if plan is not None else float(budget_cells),
        nominal_max=int(plan.nominal.max()) if plan is not None else budget_cells,
        merged=plan is not None and plan.merge_to is not None, window=window,
        info=dict(plan.info) if plan is not None else {})
    r.info["chunk_only"] = True   # planned on the chunk's cells alone (compact_chunk)
    return r


def _report(name, budget_cells, cand, before: SeqState, after: SeqState, t0, plan_s, plan, window: int) -> CompactionReport:
    return CompactionReport(
        method=name, budget_cells=budget_cells, n_candidates=int(cand.sum()),
        cells_before=before.blocks[0].n_cells, cells_after=after.blocks[0].n_cells,
        bytes_before=before.nbytes, bytes_after=after.nbytes, seconds=time.perf_counter() - t0,
        plan_seconds=plan_s,
        nominal_mean=float(plan.nominal.mean()) if plan is not None else float(budget_cells),
        nominal_max=int(plan.nominal.max()) if plan is not None else budget_cells,
        merged=plan is not None and plan.merge_to is not None,
        window=window,
        info=dict(plan.info) if plan is not None else {})
