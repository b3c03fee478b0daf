"""The regions one compaction rewrites (runtime/compactor.py runs them all through one pipeline).

- `WholeSequence`: sequence 0's state blob, every block (an iSWA model's sliding-window block rides
  along untouched); the candidates are any cells of it. The blob read is the rollback point: a refused
  write puts it back.
- `LastChunk`: the last media chunk alone, marked with the scratch sequence (`llama_memory_seq_cp`, no
  copy) so that only its bytes are read; the packed cells go back through that sequence. llama.cpp places
  restored cells from the freed chunk's first cell on, so cells stay in position order. Host memory is
  one chunk, not the cache. A refused write puts the chunk's own bytes back.
- `Universe` (runtime/universe.py): recall, every cell in the context and in the store.

With a recall store, a region hands the originals of the cells it packs to the store (`store_originals`).
"""
from __future__ import annotations

import ctypes

import numpy as np

from edgekv.errors import CompactionError
from edgekv.kv.codec import SeqState, state_buffer, write_state_file
from edgekv.methods import Method, Span
from edgekv.runtime import lib, spill
from edgekv.runtime.kinds import COVERED, FROZEN, PACKED, SCRATCH_SEQ
from edgekv.runtime.lib import llama_cpp
from edgekv.runtime.window_block import thin_window_block


def write_or_restore(cache, new_state: SeqState, blob, what: str) -> int:
    """Write `new_state` as sequence 0; when llama.cpp refuses it, put `blob` (what was read) back and
    raise CompactionError. Returns the K+V bytes written."""
    lib.release_free_memory()      # before the new blob: planning's freed temporaries leave the peak
    if isinstance(blob, spill.StateFile):   # read from a file: the new context goes through one too
        new = None
        try:
            new = spill.StateFile(blob.path.parent)
            write_state_file(new_state, new.path)
            ok = cache.set_state(new)
        except OSError as e:
            raise CompactionError(f"could not write the {what} to {blob.path.parent}: {e.strerror or e}; the "
                                  "cache is as it was") from None
        finally:
            if new is not None:
                new.close()
    else:
        ok = cache.set_state(state_buffer(new_state))
    if not ok:
        restored = cache.set_state(blob)
        raise CompactionError(f"llama.cpp refused the {what}"
                              + ("; the original cache was restored" if restored
                                 else " AND the original could not be restored: call clear()")
                              + f":\n{lib.recent_log()}")
    return new_state.nbytes


class Region:
    """What every region shares: a new packed block always differs from the cells it replaces."""

    chunk_only = False
    reselect = False     # a recall re-selection (Universe)
    recalled_n = 0       # stored cells the write brings back (Universe)
    cut = None           # the question's cells left out for a prefill again (Universe)
    swa_cells: tuple[int, int] | None = None   # the sliding-window block thinned: its cells before, after

    def recalled(self, new_base, src: np.ndarray, plan) -> int:
        return 0

    def unchanged(self, new_base) -> bool:
        return False

    def planned(self, view, cells) -> None:
        """Sees the method's view before it is dropped (Universe keeps the window's attention)."""

    def not_worth_it(self) -> bool:
        return False

    def extra_info(self) -> dict:
        if self.swa_cells is None:
            return {}
        return {"swa_cells_before": self.swa_cells[0], "swa_cells_after": self.swa_cells[1]}


class WholeSequence(Region):
    """Every cell of sequence 0; `cand` says which may go."""

    def __init__(self, cache, cand: np.ndarray, cap: bool, plan_as_chunk: bool) -> None:
        self.cache, self.cand, self.cap, self.plan_as_chunk = cache, cand, cap, plan_as_chunk
        self.blob = self.state = None

    def accepts(self, meth: Method, queries) -> bool:
        return True

    def read(self):
        c = self.cache
        self.blob = c.state_buffer()
        self.state = c.parse(self.blob, copy=False)   # views into the blob; checks the ledger
        return self.state.blocks[0]

    def spans(self) -> tuple[Span, ...]:
        return self.cache.spans()

    def window_outside(self, meth: Method) -> bool:
        return self.plan_as_chunk and meth.plans_on_chunk

    def slots(self, budget_cells: int) -> int:
        return budget_cells

    def wants_plan(self, meth: Method, slots: int, n_candidates: int) -> bool:
        return slots < n_candidates or meth.name == "full"

    def write(self, new_base) -> None:
        state = self.state
        rest, self.swa_cells = thin_window_block(self.cache, state.blocks[1:])
        self.bytes_after = write_or_restore(self.cache, SeqState(state.seq_id, [new_base] + rest,
                                                                 state.has_ext), self.blob, "compacted cache")

    def keep_as_is(self) -> None:
        self.cache.kind[self.cand] = PACKED
        self.bytes_after = self.state.nbytes

    def store_originals(self) -> None:
        c = self.cache
        if c.store is not None:
            idx = np.flatnonzero(self.cand & (c.cid >= 0))
            c.store.add(self.state.blocks[0], idx, c.cid[idx], c.media[idx])

    def settle(self, src: np.ndarray, pos: np.ndarray) -> None:
        c = self.cache
        c.kind = np.where(self.cand[src], PACKED, c.kind[src]).astype(np.int8)
        c.media = c.media[src]
        c.pos = pos.astype(np.int64)
        c.cid = np.where(self.cand[src], COVERED if c.store is not None else FROZEN, c.cid[src])

    def counts(self) -> tuple[int, int]:
        return int(self.cand.sum()), self.state.nbytes

    def release(self) -> None:
        pass


class LastChunk(Region):
    """The last media chunk alone, (pos lo, pos hi, cell lo, cell hi): see the module docstring."""

    chunk_only = True
    cap = True   # the context is sized for the budget: never more cells than it

    def __init__(self, cache, chunk: tuple[int, int, int, int]) -> None:
        self.cache = cache
        self.p0, self.p1, self.i0, self.i1 = chunk
        n = self.i1 - self.i0
        self.cand = np.ones(n, bool)
        self.cand[-1] = False            # the pos_max cell: copied whole
        self.mem = llama_cpp.llama_get_memory(cache.model.ctx)

    def accepts(self, meth: Method, queries) -> bool:
        return meth.plans_on_chunk and not (meth.needs_queries and queries is None)

    def read(self):
        """The chunk's cells through the scratch sequence; None when they are not the chunk we tracked."""
        mem = self.mem
        llama_cpp.llama_memory_seq_rm(mem, SCRATCH_SEQ, -1, -1)   # nothing left over from an interrupted one
        llama_cpp.llama_memory_seq_cp(mem, 0, SCRATCH_SEQ, self.p0, self.p1)
        try:
            self.blob = self.cache.state_buffer(SCRATCH_SEQ)
            state = self.cache.parse(self.blob, copy=False, cells=slice(self.i0, self.i1))
        except BaseException:
            self.release()
            raise
        if state.blocks[0].n_cells != self.i1 - self.i0 or len(state.blocks) != 1:
            self.release()
            return None
        self.base = state.blocks[0]
        return self.base

    def spans(self) -> tuple[Span, ...]:
        return (Span(0, self.i1 - self.i0, "media", int(self.cache.media[self.i0])),)

    def window_outside(self, meth: Method) -> bool:
        return True

    def slots(self, budget_cells: int) -> int:
        return max(1, budget_cells - 1)   # + the pos_max cell = the budget

    def wants_plan(self, meth: Method, slots: int, n_candidates: int) -> bool:
        return slots < n_candidates

    def write(self, new_base) -> None:
        """The chunk leaves seq 0 (its cells stay held by the scratch sequence); set_data frees them and
        places the packed cells from the first freed one on; then they move back to seq 0."""
        mem, c = self.mem, self.cache
        new_blob = state_buffer(SeqState(SCRATCH_SEQ, [new_base], c.model.layout.mrope))
        llama_cpp.llama_memory_seq_rm(mem, 0, self.p0, self.p1)
        if not self._set(new_blob):
            log = lib.recent_log()
            restored = self._set(self.blob)
            if restored:
                llama_cpp.llama_memory_seq_cp(mem, SCRATCH_SEQ, 0, -1, -1)
            self.release()
            raise CompactionError("llama.cpp refused the compacted chunk"
                                  + ("; the original chunk was restored" if restored
                                     else " AND the original chunk could not be restored: call clear()")
                                  + f":\n{log}")
        llama_cpp.llama_memory_seq_cp(mem, SCRATCH_SEQ, 0, -1, -1)
        self.release()

    def _set(self, blob: ctypes.Array) -> bool:
        ptr = ctypes.cast(blob, ctypes.POINTER(ctypes.c_uint8))
        return llama_cpp.llama_state_seq_set_data(self.cache.model.ctx, ptr, len(blob), SCRATCH_SEQ) == len(blob)

    def keep_as_is(self) -> None:
        self.release()
        self.cache.kind[self.i0:self.i1] = PACKED
        self.cache.last_chunk = None

    def store_originals(self) -> None:
        c = self.cache
        if c.store is not None:
            cid = c.cid[self.i0:self.i1]
            idx = np.flatnonzero(self.cand & (cid >= 0))
            c.store.add(self.base, idx, cid[idx], c.media[self.i0:self.i1][idx])

    def settle(self, src: np.ndarray, pos: np.ndarray) -> None:
        # Every cell of the chunk is settled, its last (pos_max) cell included: later chunks do not
        # reconsider it, so the next chunk is again the only candidates (CompressedCache.chunk_range).
        c, i0, i1 = self.cache, self.i0, self.i1
        c.kind = np.concatenate([c.kind[:i0], np.full(len(src), PACKED, np.int8), c.kind[i1:]])
        c.media = np.concatenate([c.media[:i0], c.media[i0:i1][src], c.media[i1:]])
        c.pos = np.concatenate([c.pos[:i0], pos.astype(np.int64), c.pos[i1:]])
        cid = np.where(self.cand[src], COVERED if c.store is not None else FROZEN, c.cid[i0:i1][src])
        c.cid = np.concatenate([c.cid[:i0], cid, c.cid[i1:]])
        c.last_chunk = None

    # bytes from cell counts: the rest of the cache is never read
    def counts(self) -> tuple[int, int]:
        return self.i1 - self.i0 - 1, self.cache.n_cells * self.cache.model.cell_bytes

    @property
    def bytes_after(self) -> int:
        return self.cache.n_cells * self.cache.model.cell_bytes

    def release(self) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, SCRATCH_SEQ, -1, -1)
