"""The compressed cache: one llama.cpp sequence and the ledger llama.cpp does not keep for us.

After a compaction the cell count is not the position count, so we track the logical position of the
next token (`n_past`, from chunks' n_pos for M-RoPE) and, per cell in blob order, a ledger: its kind
(protected text, media waiting for compaction, packed slots), its media index and its position. Every
parse of the state blob checks the blob's positions against the ledger (a cell out of place is a clear
StateFormatError instead of a silent desync) and learns the positions it did not know yet (media cells:
M-RoPE positions are the projector's). Compaction runs through one pipeline (runtime/compactor.py): the
whole sequence, or the last media chunk alone through sequence 1 of the context (one cell pool with seq 0).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from edgekv.errors import Cancelled, ContextOverflowError, EdgeKVError, StateFormatError
from edgekv.kv.codec import SeqState, block_cells, block_size, parse_state, parse_state_file
from edgekv.kv.store import RecallStore
from edgekv.methods import Method, Span
from edgekv.runtime import compactor, lib, spill
from edgekv.runtime.compactor import CompactionReport
from edgekv.runtime.kinds import COVERED, FROZEN, PACKED, PENDING, PROTECTED, SCRATCH_SEQ, spans_of
from edgekv.runtime.regions import LastChunk, WholeSequence
from edgekv.runtime.universe import Universe
from edgekv.runtime.lib import llama_cpp
from edgekv.runtime.model import Model

__all__ = ["CompressedCache", "CacheMarks", "CompactionReport", "PROTECTED", "PENDING", "PACKED", "SCRATCH_SEQ",
           "CANCELLED_MESSAGE"]
CANCELLED_MESSAGE = "cancelled; the conversation is as it was before this turn"


@dataclass(frozen=True)
class CacheMarks:
    """The ledger of a CompressedCache at one moment (not the cells' bytes): the cache part of a SessionSnapshot."""

    n_past: int
    kind: np.ndarray
    media: np.ndarray
    n_media: int
    window_q: np.ndarray | None
    window_rows: int
    logits: np.ndarray | None
    after_media: bool = False
    pos: np.ndarray | None = None   # per cell; None: not known (learnt at the next parse)
    cid: np.ndarray | None = None   # per cell; None: not known (a file saved before cell ids)
    store: RecallStore | None = None  # the recall store and how many of its rows are this moment's
    store_n: int = 0
    window_q_swa: np.ndarray | None = None   # the window's queries in the sliding-window layers (swa_budget)


@dataclass
class TextRun:
    """Recall: the text prefilled since the last media chunk or answer in this turn (the question), from
    position p0; swa is the sliding-window block at p0 (iSWA models). A re-selection that brings cells
    back removes these cells exactly and prefills the tokens again, so they see the new context."""

    p0: int
    swa: bytes | None
    tokens: list


class CompressedCache:
    """Sequence 0 of the model's context, its cells' kinds and positions, decode and compaction."""

    def __init__(self, model: Model, store: RecallStore | None = None) -> None:
        self.model = model
        self.plan_as_chunk = False   # see compact()
        self.store = store           # the recall store (kv/store.py); None: recall off
        self.reprefill = "question"  # recall: what is prefilled again when cells come back ("question" / "last")
        self.recall_min_share = 0.0  # recall: bring cells back only when a head gets this much attention from them
        self.swa_budget = 1.0        # iSWA: the share of the sliding-window block a compaction with a window keeps
        self.swa_queries = False     # keep the window layers' queries with swa_budget 1 too (the eval sets it
                                     # per run after one prefill)
        self.batch = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
        self.reset()

    # --- bookkeeping ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the sequence and forget every cell."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.model.ctx), True)
        self.n_past = 0
        self.kind = np.zeros(0, np.int8)        # per cell, blob order: PROTECTED / PENDING / PACKED
        self.media = np.zeros(0, np.int32)      # per cell: media index or -1
        self.pos = np.zeros(0, np.int64)        # per cell: its position, -1 until a parse has seen it
        self.cid = np.zeros(0, np.int64)        # per cell: its id (prefill order), COVERED or FROZEN slots
        self.next_cid = 0
        self.run: TextRun | None = None          # recall: the text prefilled since the last media/answer
        self.reselect_due = False                # recall: a question window was captured, not yet chosen with
        self.swa_due = False                     # swa_budget: a question window the window block was not thinned with
        self.n_media = 0
        self.window_q: np.ndarray | None = None  # captured queries of the last prompt tokens [L, H, W, d]
        self.window_q_swa: np.ndarray | None = None  # the same rows in the sliding-window layers (iSWA)
        self.window_rows = 0
        self.logits: np.ndarray | None = None    # after the last decoded token
        self.logits_after_media = False          # True: the prompt ends with media (no logits there)
        self.last_chunk: tuple[int, int, int, int] | None = None  # (pos lo, pos hi, cell lo, cell hi)
        if self.store is not None:   # a new conversation: a new store (snapshots may hold the old one)
            self.store = self.store.fresh()

    @property
    def n_cells(self) -> int:
        return int(self.kind.shape[0])

    def marks(self) -> CacheMarks:
        return CacheMarks(self.n_past, self.kind.copy(), self.media.copy(), self.n_media, self.window_q,
                          self.window_rows, self.logits, self.logits_after_media, self.pos.copy(), self.cid.copy(),
                          self.store, 0 if self.store is None else self.store.n, self.window_q_swa)

    def set_marks(self, m: CacheMarks, fork: bool = False) -> None:
        """Return to `m`. The recall store goes back to m's rows: cut (a failed turn: its rows were this
        turn's) or, with fork, copied when rows after m's exist (a restored snapshot: another branch of
        the conversation may own those rows)."""
        self.n_past, self.kind, self.media, self.n_media = m.n_past, m.kind.copy(), m.media.copy(), m.n_media
        self.window_q, self.window_rows, self.logits = m.window_q, m.window_rows, m.logits
        self.window_q_swa = m.window_q_swa
        self.logits_after_media = m.after_media
        self.pos = m.pos.copy() if m.pos is not None else np.full(len(m.kind), -1, np.int64)
        if m.cid is not None:
            self.cid = m.cid.copy()
        else:   # no ids saved: originals get new ones, packed slots are frozen (no originals to recall)
            self.cid = np.where(m.kind == PACKED, FROZEN, np.arange(len(m.kind))).astype(np.int64)
        self.next_cid = int(self.cid.max(initial=-1)) + 1
        self.last_chunk = None
        self.run = None
        self.reselect_due = False
        if self.store is None or m.store is None:   # recall off here, or the moment had no store (a loaded file)
            self.forget_store()
            return
        if m.store.n > m.store_n and fork:
            self.store = m.store.fork(m.store_n)
        else:
            self.store = m.store
            self.store.truncate(m.store_n)
        if self.store.n:
            self.next_cid = max(self.next_cid, int(self.store.cid.max()) + 1)

    def forget_store(self) -> None:
        """The store cannot be read (file gone or changed): keep the conversation, without recall of what
        it held (its slots stay as they are, never recalled)."""
        if self.store is not None:
            self.store = self.store.fresh()
        self.cid[self.cid == COVERED] = FROZEN

    def add_cells(self, n: int, kind: int, media: int = -1) -> None:
        """Record the last n decoded cells: text at positions n_past-n.. (one each), media at positions
        the next parse learns (M-RoPE chunks use n_pos positions for n tokens)."""
        pos = np.arange(self.n_past - n, self.n_past, dtype=np.int64) if media < 0 else np.full(n, -1, np.int64)
        self.kind = np.concatenate([self.kind, np.full(n, kind, np.int8)])
        self.media = np.concatenate([self.media, np.full(n, media, np.int32)])
        self.pos = np.concatenate([self.pos, pos])
        self.cid = np.concatenate([self.cid, np.arange(self.next_cid, self.next_cid + n, dtype=np.int64)])
        self.next_cid += n

    def forget_last(self, n: int) -> None:
        """Take the last n cells out of the ledger (the caller removed them from llama.cpp's cache)."""
        if n:
            self.kind, self.media, self.pos, self.cid = self.kind[:-n], self.media[:-n], self.pos[:-n], self.cid[:-n]

    def drop_tail(self, n_past: int, n_cells: int) -> None:
        """Remove every cell at position >= n_past: the last cells, when nothing was compacted since."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.model.ctx), 0, n_past, -1)
        self.n_past = n_past
        self.last_chunk = None
        self.run = None
        self.kind, self.media, self.pos = self.kind[:n_cells], self.media[:n_cells], self.pos[:n_cells]
        self.cid = self.cid[:n_cells]

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

    def set_state(self, blob: bytes | ctypes.Array | spill.StateFile) -> bool:
        """Write a state blob back: a ctypes buffer as it is, bytes without a copy (llama.cpp only reads),
        a state file read by llama.cpp a layer at a time."""
        if isinstance(blob, spill.StateFile):
            return spill.load(self.model.ctx, blob)
        n = len(blob)
        if isinstance(blob, ctypes.Array):
            ptr = ctypes.cast(blob, ctypes.POINTER(ctypes.c_uint8))
        else:
            blob = bytes(blob)  # a no-op for bytes; the pointer below must point at immutable memory
            ptr = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))
        return llama_cpp.llama_state_seq_set_data(self.model.ctx, ptr, n, 0) == n

    def spill_state(self, folder) -> spill.StateFile:
        """Sequence 0 saved to a state file in `folder` (llama.cpp writes it a layer at a time)."""
        return spill.save(self.model.ctx, 0, folder)

    def parse(self, blob: bytes | ctypes.Array | spill.StateFile, copy: bool = True, cells: slice | None = None,
              ledger: bool = True) -> SeqState:
        """A state blob of the sequence (or, with `cells`, of those ledger cells alone) as arrays, checked
        against the ledger: the cells must stand where it has them (see the module docstring).
        ledger=False: a blob from elsewhere (a saved conversation), not checked. A state file's rows stay
        in the file, read a layer at a time when used."""
        lay = self.model.layout
        if isinstance(blob, spill.StateFile):
            state = parse_state_file(blob.path, has_ext=lay.mrope, n_blocks=2 if lay.iswa else 1)
        else:
            state = parse_state(blob, has_ext=lay.mrope, n_blocks=2 if lay.iswa else 1, copy=copy)
        base = state.blocks[0]
        if ledger:
            self._check_ledger(base.pos, slice(None) if cells is None else cells)
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

    def _check_ledger(self, pos: np.ndarray, cells: slice) -> None:
        want = self.pos[cells]
        if len(want) != len(pos):
            raise StateFormatError(f"the cache holds {len(pos)} cells where the ledger has {len(want)}")
        known = want >= 0
        if (pos[known] != want[known]).any():
            i = int(np.flatnonzero(known & (pos != want))[0])
            raise StateFormatError(f"the cache's cells are out of the ledger's order: cell {i} holds position "
                                   f"{int(pos[i])} where the ledger has {int(want[i])}; call clear()")
        self.pos[cells] = pos

    def nbytes(self) -> int:
        """K+V bytes the sequence holds in all cache blocks, from the ledger and llama.cpp's blob size (not
        the blob: after a re-selection over a big context that was a whole copy of it)."""
        if not self.n_cells:
            return 0
        lay, m = self.model.layout, self.model
        n_global = len(lay.global_layers)
        base = self.n_cells * m.cell_bytes                       # the base block: the ledger's cells
        rest = llama_cpp.llama_state_seq_get_size(m.ctx, 0) - 8 - block_size(self.n_cells, n_global, base, lay.mrope)
        if not lay.iswa:
            return base if rest == 0 else self.counted_nbytes()
        n_window = lay.n_layer - n_global                        # the window block: as many cells as its size says
        per = m.cell_bytes // n_global * n_window                # a window cell: the same rows in its layers
        cells = block_cells(rest, n_window, per, lay.mrope)
        return base + cells * per if cells is not None else self.counted_nbytes()

    def counted_nbytes(self) -> int:
        """K+V bytes of the state blob, read and parsed (the ledger checked on the way)."""
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
        return spans_of(self.kind, self.media)

    def note_chunk(self, p0: int, p1: int, n: int) -> None:
        """The media chunk just decoded at positions [p0, p1) is the last n cells."""
        self.last_chunk = (p0, p1, self.n_cells - n, self.n_cells)

    def chunk_range(self, cand: np.ndarray) -> tuple[int, int, int, int] | None:
        """(pos lo, pos hi, cell lo, cell hi) of the last media chunk when the candidates are that chunk
        and nothing else (its last cell, the pos_max cell, excluded), with only text (a probe) after it:
        then compact(chunk=...) can rewrite it alone. None: the whole sequence."""
        if self.last_chunk is None or self.model.layout.iswa:  # iSWA: seq ops would touch the SWA block
            return None
        p0, p1, i0, i1 = self.last_chunk
        idx = np.flatnonzero(cand)
        if (i1 - i0 < 2 or i1 > self.n_cells or idx.size != i1 - i0 - 1 or idx[0] != i0 or idx[-1] != i1 - 2
                or (self.kind[i1:] != PROTECTED).any()):
            return None
        return p0, p1, i0, i1

    def start_run(self) -> None:
        """Recall: text prefill begins; remember where (see TextRun), unless a run is going on."""
        if self.store is not None and self.run is None:
            swa = self.swa_state() if self.model.layout.iswa and self.n_cells else None
            self.run = TextRun(self.n_past, swa, [])

    def compact(self, meth: Method, budget_cells: int, *, cand: np.ndarray | None = None,
                chunk: tuple[int, int, int, int] | None = None, use_queries: bool, seed: int, early: bool = False,
                on_blob: Callable[[ctypes.Array], None] | None = None, cap: bool = False,
                universe: bool = False) -> CompactionReport | None:
        """Compact the candidate cells `cand` of the whole sequence, or with `chunk` (see chunk_range) the
        last media chunk alone; one pipeline either way (runtime/compactor.py). None: the chunk path cannot
        serve this method, nothing changed. cap: keep at most budget_cells slots (Plan.capped), for a
        context sized for the budget. With `plan_as_chunk` set (benchmarks), a method that can plans on
        the candidates alone with the window outside the view, as a chunk plans, so that planning is
        measured where the chunk path cannot run (iSWA models). universe: (recall) choose among every cell,
        in the context and in the store (the `Universe` region); `cand` then says which context cells may
        go, and the question's text run is prefilled again when cells come back."""
        if universe:
            region = Universe(self, cand, cap)
        else:
            region = (LastChunk(self, chunk) if chunk is not None
                      else WholeSequence(self, cand, cap, self.plan_as_chunk))
        return compactor.compact(self, meth, region, budget_cells, use_queries=use_queries, seed=seed,
                                 early=early, on_blob=on_blob)

    def free(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
