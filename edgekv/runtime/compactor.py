"""One compaction pipeline: read a region's cells, let a method plan, pack, write back, settle the ledger.

A region is what one compaction rewrites (docs/architecture.md, "Compaction"):

- `WholeSequence`: sequence 0's state blob, every block (an iSWA model's sliding-window block rides
  along untouched); the candidates are any cells of it. The blob read is the rollback point: a refused
  write puts it back.
- `LastChunk`: the last media chunk alone, marked with the scratch sequence (`llama_memory_seq_cp`, no
  copy) so that only its bytes are read; the packed cells go back through that sequence. llama.cpp places
  restored cells from the freed chunk's first cell on, so cells stay in position order. Host memory is
  one chunk, not the cache. A refused write puts the chunk's own bytes back.

Both go through `compact()`: resolve `auto`, read, plan on the view the method asks for, pack
(`edgekv.kv.packer`), write, and update the cache's bookkeeping (kind, media index, position of every
cell). The report has typed fields; `method` is only the label people read.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

import numpy as np

from edgekv.errors import CompactionError, EdgeKVError
from edgekv.kv.codec import SeqState, parse_state, state_buffer
from edgekv.kv.packer import layer_floats, pack_block
from edgekv.methods import KVView, Method, Span
from edgekv.methods.parallel import planning_threads
from edgekv.runtime import lib
from edgekv.runtime.lib import llama_cpp

PROTECTED, PENDING, PACKED = 0, 1, 2
COVERED, FROZEN = -1, -2   # a packed slot's cell id: its originals are in the recall store / are not
SCRATCH_SEQ = 1  # marks one media chunk for LastChunk (the context has 2 sequences, one cell pool)
EARLY = " (early, before the question)"


@dataclass
class CompactionReport:
    """What one compaction did. `method` is the label (e.g. "auto -> hybridkv (probe: generic)"), built
    from the typed fields; code reads the fields."""

    resolved: str              # the method that planned (auto's pick)
    budget_cells: int          # cells per (layer, head) the user's budget asked for
    n_candidates: int          # compressible cells before
    cells_before: int
    cells_after: int
    bytes_before: int          # K+V bytes of the whole sequence (all cache blocks)
    bytes_after: int
    seconds: float             # read + plan + pack + write back (+ the probe's decode and removal)
    plan_seconds: float
    nominal_mean: float
    nominal_max: int
    merged: bool
    window: int                # captured query rows used (0 = query-agnostic)
    info: dict = field(default_factory=dict)
    auto: bool = False         # `auto` picked `resolved`
    early: bool = False        # before the question (media still coming in)
    probe: str | None = None   # the window was a probe: "question" (known in advance) or "generic"
    chunk_only: bool = False   # the last media chunk alone (LastChunk)
    # recall (docs/recall.md): the store after this compaction, and what a re-selection did
    store_cells: int = 0       # cells whose originals the store holds
    store_bytes: int = 0
    store_where: str | None = None   # "RAM" or the file; None: recall off
    reselect: bool = False     # chose among every cell, in the context and in the store (Universe)
    recalled: int = 0          # cells brought back from the store (into at least one layer and head)
    rewritten: bool = True     # False: the chosen set was the context's, nothing was written
    reprefill_tokens: int = 0  # the question's tokens prefilled again after cells came back

    @property
    def method(self) -> str:
        return (("auto -> " if self.auto else "") + self.resolved + (EARLY if self.early else "")
                + (f" (probe: {self.probe})" if self.probe else ""))

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @classmethod
    def from_dict(cls, d: dict) -> "CompactionReport":
        """From `dataclasses.asdict` (a saved conversation's header). Files saved before the typed fields
        carry the label alone: its parts are read back once, here."""
        d = dict(d)
        label = d.pop("method", None)
        if "resolved" not in d and label is not None:
            d["auto"] = label.startswith("auto -> ")
            rest = label[len("auto -> "):] if d["auto"] else label
            d["probe"] = ("question" if "(probe: question)" in rest else "generic" if "(probe: generic)" in rest
                          else None)
            d["early"] = EARLY in rest
            d["resolved"] = rest.split(" (")[0]
            d["chunk_only"] = bool(d.get("info", {}).get("chunk_only"))
        return cls(**d)


def spans_of(kind: np.ndarray, media: np.ndarray) -> tuple[Span, ...]:
    """Runs of cells of one kind: text, one media index, or packed slots."""
    spans, start, n = [], 0, len(kind)
    key = np.where(kind == PACKED, -2, media)
    for i in range(1, n + 1):
        if i == n or key[i] != key[start]:
            m = int(media[start])
            spans.append(Span(start, i, "media" if m >= 0 else "text", m))
            start = i
    return tuple(spans)


class _Region:
    """What every region shares: a new packed block always differs from the cells it replaces."""

    chunk_only = False

    def recalled(self, new_base, src: np.ndarray, plan) -> int:
        return 0

    def unchanged(self, new_base) -> bool:
        return False


class WholeSequence(_Region):
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
        c, state = self.cache, self.state
        new_state = SeqState(state.seq_id, [new_base] + state.blocks[1:], state.has_ext)
        if not c.set_state(state_buffer(new_state)):
            restored = c.set_state(self.blob)
            raise CompactionError("llama.cpp refused the compacted cache"
                                  + ("; the original cache was restored" if restored
                                     else " AND the original could not be restored: call clear()")
                                  + f":\n{lib.recent_log()}")
        self.bytes_after = new_state.nbytes

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


class LastChunk(_Region):
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


class Universe(_Region):
    """Recall (docs/recall.md): every cell, in the context and in the store. The context's covered slots
    are set aside and their originals read from the store; the universe is in prefill order (position,
    then cell id). `cand` says which context cells may go (pending media; with compress="all" any
    unpacked one); packed originals and every stored cell are candidates too, so each question chooses
    among all of them. When the plan brings stored cells back and the question's text run
    (`CompressedCache.run`) is the tail, the run's cells are left out of the written block, with the
    sliding-window block from the run's start (iSWA), for the caller to prefill again on the new context."""

    def __init__(self, cache, cand: np.ndarray, cap: bool) -> None:
        self.cache, self.ctx_cand, self.cap = cache, cand, cap
        self.blob = self.state = None
        self.cut = None

    def accepts(self, meth: Method, queries) -> bool:
        return True

    def read(self):
        c = self.cache
        self.blob = c.state_buffer()
        self.state = c.parse(self.blob, copy=False)
        self.ctx = ctx = self.state.blocks[0]
        n = ctx.n_cells
        cand = self.ctx_cand | ((c.kind == PACKED) & (c.cid >= 0))
        cand[max(0, n - c.window_rows):] = False
        if c.run is not None:      # the question's own text stays (and is prefilled again if cells come back)
            before = c.pos < c.run.p0
            cand[~before] = False
            if before.any():        # the cell before it: the pos_max the prefill again continues from
                cand[np.flatnonzero(before)[-1]] = False
        if n:
            cand[-1] = False
        keep = np.flatnonzero(c.cid != COVERED)        # originals and frozen slots
        parts = [ctx.take(keep)]
        kind = np.where((c.kind == PACKED) & (c.cid >= 0), PENDING, c.kind)   # packed originals: what they were
        kind, media, cid, cands = [kind[keep]], [c.media[keep]], [c.cid[keep]], [cand[keep]]
        store = c.store
        if store is not None and store.n:
            parts.append(store.rows())
            kind.append(np.full(store.n, PENDING, np.int8))
            media.append(store.media)
            cid.append(store.cid)
            cands.append(np.ones(store.n, bool))
        kind, media, cid, cands = (np.concatenate(a) for a in (kind, media, cid, cands))
        from_store = np.arange(len(kind)) >= len(keep)
        block = _concat(parts)
        order = np.lexsort((cid, block.pos))           # prefill order; frozen slots first at a position
        self.kind, self.media, self.cid = kind[order], media[order], cid[order]
        self.cand, self.from_store = cands[order], from_store[order]
        self.base = block.take(order)
        # packed cells that stay whole here (the cell before the question) take one of the slots
        self.held_back = int(((c.kind == PACKED) & (c.cid >= 0) & ~cand).sum())
        return self.base

    def spans(self) -> tuple[Span, ...]:
        return spans_of(self.kind, self.media)

    def window_outside(self, meth: Method) -> bool:
        return False

    def slots(self, budget_cells: int) -> int:
        return max(1, budget_cells - self.held_back)

    def wants_plan(self, meth: Method, slots: int, n_candidates: int) -> bool:
        return slots < n_candidates or meth.name == "full"

    def recalled(self, new_base, src: np.ndarray, plan) -> int:
        """Stored cells the plan puts in a (layer, head) whose context rows do not hold them already."""
        stored = self.from_store
        if not stored.any():
            return 0
        n_heads = plan.keep.shape[1]
        back = np.zeros(len(stored), bool)
        for il, (old, new) in enumerate(zip(self.ctx.layers, self.base.layers)):
            have = _head_hashes(old.k, n_heads)                  # [n_ctx, H]
            for h in range(n_heads):
                idx = plan.keep[il, h]
                idx = idx[stored[idx]]
                if idx.size:
                    mine = _head_hashes(new.k[idx], n_heads)[:, h]
                    back[idx[~np.isin(mine, have[:, h])]] = True
        return int(back.sum())

    def unchanged(self, new_base) -> bool:
        old = self.ctx
        if new_base.n_cells != old.n_cells or (new_base.pos != old.pos).any():
            return False
        same = all(np.array_equal(a.k, b.k) and np.array_equal(a.v, b.v) for a, b in zip(old.layers, new_base.layers))
        self.bytes_after = self.state.nbytes
        return same

    def write(self, new_base) -> None:
        c, state = self.cache, self.state
        run = self.question_run()
        if self.recalled_n and run is not None:
            self.cut = run
            new_base = new_base.take(np.flatnonzero(new_base.pos < run.p0))
            if run.swa is not None:     # the sliding-window block as the question's prefill began
                rest = [parse_state(run.swa, has_ext=state.has_ext, n_blocks=1).blocks[0]]
            else:                       # one token, or no sliding window: its cells alone go
                rest = [b.take(np.flatnonzero(b.pos < run.p0)) for b in state.blocks[1:]]
        else:
            rest = state.blocks[1:]
        new_state = SeqState(state.seq_id, [new_base] + rest, state.has_ext)
        if not c.set_state(state_buffer(new_state)):
            restored = c.set_state(self.blob)
            raise CompactionError("llama.cpp refused the re-selected cache"
                                  + ("; the original cache was restored" if restored
                                     else " AND the original could not be restored: call clear()")
                                  + f":\n{lib.recent_log()}")
        self.bytes_after = new_state.nbytes

    def question_run(self):
        """What to prefill again when cells come back (CompressedCache.reprefill): the question's whole
        text run, or its last token alone; None when the run is not the intact tail of the cache."""
        c = self.cache
        run = c.run
        if run is None or not run.tokens:
            return None
        tail = self.base.pos >= run.p0
        if int(tail.sum()) != len(run.tokens) or self.cand[tail].any():
            return None
        if c.reprefill == "last" and len(run.tokens) > 1:
            # a single token cannot have pushed out a sliding-window cell it needs itself: exact without a checkpoint
            return type(run)(run.p0 + len(run.tokens) - 1, None, run.tokens[-1:])
        if self.cache.model.layout.iswa and run.swa is None:
            return None
        return run

    def keep_as_is(self) -> None:
        """Every candidate fits the budget: the universe goes back whole (stored cells included)."""
        c = self.cache
        if not self.from_store.any():
            c.kind[self.ctx_cand | (c.kind == PACKED)] = PACKED
            self.bytes_after = self.state.nbytes
            return
        self.recalled_n = int(self.from_store.sum())
        self.store_originals()
        self.write(self.base)
        self.settle(np.arange(self.base.n_cells), self.base.pos)

    def store_originals(self) -> None:
        c = self.cache
        if c.store is None:
            return
        idx = np.flatnonzero(self.cand & ~self.from_store & (self.cid >= 0))
        c.store.add(self.base, idx, self.cid[idx], self.media[idx])

    def settle(self, src: np.ndarray, pos: np.ndarray) -> None:
        c = self.cache
        c.kind = np.where(self.cand[src], PACKED, self.kind[src]).astype(np.int8)
        c.media = self.media[src]
        c.pos = pos.astype(np.int64)
        c.cid = np.where(self.cand[src], COVERED, self.cid[src])
        c.last_chunk = None
        if self.cut is not None:    # the run's cells were left out: the caller prefills them again
            n = len(self.cut.tokens)
            c.forget_last(n)
            c.n_past = self.cut.p0
            c.window_q, c.window_rows, c.logits = None, 0, None
            c.run = None

    def counts(self) -> tuple[int, int]:
        return int(self.cand.sum()), self.state.nbytes

    def release(self) -> None:
        pass


def _concat(blocks: list) -> "KVBlock":
    """Cells of several blocks (same layers and types) as one block."""
    from edgekv.kv.codec import KVBlock, LayerKV

    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    ext = None if first.ext is None else np.concatenate([b.ext for b in blocks])
    layers = [LayerKV(ls[0].k_type, np.concatenate([l.k for l in ls]), ls[0].v_type,
                      np.concatenate([l.v for l in ls])) for ls in zip(*(b.layers for b in blocks))]
    return KVBlock(pos=np.concatenate([b.pos for b in blocks]), seq_id=np.concatenate([b.seq_id for b in blocks]),
                   ext=ext, v_trans=first.v_trans, layers=layers)


_HASH_W = np.random.default_rng(12345).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def _head_hashes(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """[n, H] uint64: a hash of each head's bytes in each row (rows equal as bytes hash equal)."""
    n, width = rows.shape
    hb = width // n_heads
    pad = (-hb) % 8
    r = np.ascontiguousarray(rows).reshape(n, n_heads, hb)
    if pad:
        r = np.concatenate([r, np.zeros((n, n_heads, pad), np.uint8)], axis=2)
    words = r.view(np.uint64)                              # [n, H, (hb+pad)/8]
    with np.errstate(over="ignore"):
        return (words * _HASH_W[:words.shape[2]]).sum(axis=2, dtype=np.uint64)


def compact(cache, meth: Method, region, budget_cells: int, *, use_queries: bool, seed: int,
            early: bool = False, on_blob=None) -> CompactionReport | None:
    """Plan with `meth` over the region's candidates and write the packed cells back. On any failure the
    original cells are restored and CompactionError raised. Returns None, having changed nothing, when
    `region` cannot serve this method (a LastChunk for a method that needs the whole cache, or a chunk
    that is not the one tracked): the caller then compacts the WholeSequence. on_blob sees the whole
    sequence's blob before the rewrite (a turn's rollback point)."""
    t0 = time.perf_counter()
    lay, model = cache.model.layout, cache.model
    queries = cache.window_q if use_queries else None
    auto = bool(getattr(meth, "resolve", None))
    if auto:   # `auto`: its pick depends only on whether a question window was captured
        meth = meth.resolve(_QueriesOnly(queries))
    if not region.accepts(meth, queries):
        return None
    base = region.read()
    if base is None:
        return None
    store = cache.store
    store_n0 = store.n if store is not None else 0
    recalled, rewritten = 0, True
    try:
        if on_blob is not None and not region.chunk_only:
            on_blob(region.blob)
        cells_before = cache.n_cells
        if meth.needs_queries and queries is None:
            raise EdgeKVError(f"method {meth.name!r} needs the question's queries, but none were captured "
                              "(flash attention capture off, or no text after the media): use "
                              "--method flashcache or --method auto")
        window = 0 if queries is None else int(queries.shape[2])  # captured rows (the report's)
        view, cells = method_view(meth, base, lay.n_head_kv, region.cand, region.spans(), queries,
                                  lay.attn_scale, seed, rope=(lay.rope_base, lay.rope_neox),
                                  window_outside=region.window_outside(meth),
                                  key_rotation=model.rotation.key_matrix(lay.head_dim))
        slots = region.slots(budget_cells)
        t1 = time.perf_counter()
        with planning_threads(model.threads):
            plan = meth.plan(view, slots) if region.wants_plan(meth, slots, view.n_candidates) else None
        if plan is not None and region.cap:
            plan = plan.capped(slots)   # a context sized for the budget: never more cells than it
        plan_s = time.perf_counter() - t1
        n_candidates, bytes_before = region.counts()
        if plan is None:  # the budget covers everything: keep the cells as they are
            region.keep_as_is()
        else:
            plan, merged = _cells_and_merges(meth, view, cells, plan, base, lay.n_head_kv)
            del view
            new_base, src = pack_block(base, plan, region.cand, lay.n_head_kv, merged)
            if region.unchanged(new_base):   # the context already holds this choice: write nothing
                rewritten = False
                region.recalled_n = 0
                region.release()
            else:
                recalled = region.recalled(new_base, src, plan)
                region.recalled_n = recalled
                region.store_originals()
                region.write(new_base)
                region.settle(src, new_base.pos)
    except BaseException:
        region.release()
        if store is not None:
            store.truncate(store_n0)
        raise
    recalled = getattr(region, "recalled_n", recalled)
    return CompactionReport(
        resolved=meth.name, auto=auto, early=early, chunk_only=region.chunk_only, budget_cells=budget_cells,
        n_candidates=n_candidates, cells_before=cells_before, cells_after=cache.n_cells,
        bytes_before=bytes_before, bytes_after=region.bytes_after,
        seconds=time.perf_counter() - t0, plan_seconds=plan_s,
        nominal_mean=float(plan.nominal.mean()) if plan is not None else float(budget_cells),
        nominal_max=int(plan.nominal.max()) if plan is not None else budget_cells,
        merged=plan is not None and plan.merge_to is not None, window=window,
        info=dict(plan.info) if plan is not None else {},
        store_cells=0 if store is None else store.n, store_bytes=0 if store is None else store.nbytes,
        store_where=None if store is None else store.where, reselect=isinstance(region, Universe),
        recalled=recalled, rewritten=rewritten,
        reprefill_tokens=0 if getattr(region, "cut", None) is None else len(region.cut.tokens))


def method_view(meth: Method, base, n_kv_heads: int, cand: np.ndarray, spans: tuple[Span, ...], queries,
                scale: float, seed: int, rope: tuple[float, bool] | None = None, window_outside: bool = False,
                key_rotation: np.ndarray | None = None) -> tuple[KVView, np.ndarray | None]:
    """The view `meth` plans on, converting to float32 only what it reads (Method.view_cells,
    reads_keys, reads_values), and the cells it covers (None: all, in order). window_outside: a view of
    the candidates alone, with the window's queries (as a LastChunk plans). key_rotation: llama.cpp's
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
