"""Recall's region: every cell, in the context and in the recall store (docs/recall.md).

`Universe` goes through the same pipeline as the other regions (runtime/compactor.py); runtime/recall.py
decides when a question chooses again and prefills the question after a rewrite.
"""
from __future__ import annotations

import numpy as np

from edgekv.errors import StateFormatError
from edgekv.kv.codec import KVBlock, LazyLayerKV, SeqState, parse_state
from edgekv.methods import Method, Span
from edgekv.runtime.kinds import COVERED, PACKED, PENDING, spans_of
from edgekv.runtime.regions import Region, write_or_restore
from edgekv.runtime.window_block import thin_window_block


class Universe(Region):
    """Recall (docs/recall.md): every cell, in the context and in the store. The context's covered slots
    are set aside and their originals read from the store; the universe is in prefill order (position,
    then cell id). `cand` says which context cells may go (pending media; with compress="all" any
    unpacked one); packed originals and every stored cell are candidates too, so each question chooses
    among all of them. When the plan brings stored cells back and the question's text run
    (`CompressedCache.run`) is the tail, the run's cells are left out of the written block, with the
    sliding-window block from the run's start (iSWA), for the caller to prefill again on the new context."""

    reselect = True

    def __init__(self, cache, cand: np.ndarray, cap: bool) -> None:
        self.cache, self.ctx_cand, self.cap = cache, cand, cap
        self.blob = self.state = None
        self.scores = self.share = None      # window attention on the universe; recalled heads' share

    def accepts(self, meth: Method, queries) -> bool:
        return True

    def read(self):
        c = self.cache
        store = c.store
        self.blob = None
        if store is not None and store.mode == "disk":   # the context as read stays on disk too (spill.py)
            try:
                self.blob = c.spill_state(store.directory)
            except (OSError, StateFormatError):   # no room for the file: hold it in memory, as a RAM store does
                self.blob = None
        if self.blob is None:
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
        kind = np.where((c.kind == PACKED) & (c.cid >= 0), PENDING, c.kind)   # packed originals: what they were
        kind, media, cid, cands, pos = [kind[keep]], [c.media[keep]], [c.cid[keep]], [cand[keep]], [ctx.pos[keep]]
        store = c.store if c.store is not None and c.store.n else None
        if store is not None:
            kind.append(np.full(store.n, PENDING, np.int8))
            media.append(store.media)
            cid.append(store.cid)
            cands.append(np.ones(store.n, bool))
            pos.append(store.pos)
        kind, media, cid, cands, pos = (np.concatenate(a) for a in (kind, media, cid, cands, pos))
        order = np.lexsort((cid, pos))                 # prefill order; frozen slots first at a position
        self.kind, self.media, self.cid = kind[order], media[order], cid[order]
        self.cand, self.from_store = cands[order], order >= len(keep)
        self.ctx_index = np.full(len(order), -1, np.int64)       # the context cell behind a universe cell
        self.ctx_index[~self.from_store] = keep[order[~self.from_store]]
        self.base = _gather(ctx, keep, store, order)
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

    def planned(self, view, cells) -> None:
        """Keeps the window's attention on every universe cell [L, H_kv, N] when the method computed it
        (or the gate needs it): what `recalled` weighs the cells coming back with."""
        if view.queries is None or not ("_window_reductions" in view.__dict__ or self.cache.recall_min_share > 0):
            return
        ws = np.asarray(view.window_scores)
        if cells is None:
            self.scores = ws
        else:
            self.scores = np.zeros(ws.shape[:2] + (len(self.cand),), np.float32)
            self.scores[..., cells] = ws

    def recalled(self, new_base, src: np.ndarray, plan) -> int:
        """Stored cells the plan puts in a (layer, head) whose context rows do not hold them already;
        `share` [L, H_kv]: their part of the window's attention on the cells chosen for that head."""
        stored = self.from_store
        if not stored.any():
            return 0
        L, n_heads = plan.keep.shape[:2]
        back = np.zeros(len(stored), bool)
        share = np.zeros((L, n_heads)) if self.scores is not None else None
        for il, (old, new) in enumerate(zip(self.ctx.layers, self.base.layers)):
            have = _head_hashes(old.k, n_heads)                  # [n_ctx, H]
            rows = new.k      # gathered (a disk store read) once per layer, not once per head
            for h in range(n_heads):
                idx = plan.keep[il, h]
                idx = idx[stored[idx]]
                if idx.size:
                    mine = _head_hashes(rows[idx], n_heads)[:, h]
                    came = idx[~np.isin(mine, have[:, h])]
                    back[came] = True
                    if share is not None and came.size:
                        total = float(self.scores[il, h, plan.keep[il, h]].sum())
                        share[il, h] = float(self.scores[il, h, came].sum()) / total if total > 0 else 0.0
        self.share = share
        return int(back.sum())

    def not_worth_it(self) -> bool:
        """Session(recall_min_share=s): no head would get s of its window attention from the cells coming
        back, and nothing new waits to be compacted: the context stays, and no question is prefilled again."""
        s = self.cache.recall_min_share
        if s > 0 and self.share is not None and not self.ctx_cand.any() and self.share.max() < s:
            self.bytes_after = self.state.nbytes
            return True
        return False

    def extra_info(self) -> dict:
        if self.share is None:
            return super().extra_info()
        return super().extra_info() | {"recall_share": round(float(self.share.max()), 4),
                "recall_share_mean": round(float(self.share.mean()), 4)}

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
            rest, self.swa_cells = thin_window_block(c, state.blocks[1:])
        self.bytes_after = write_or_restore(c, SeqState(state.seq_id, [new_base] + rest, state.has_ext), self.blob,
                                            "re-selected cache")

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
        if c.model.layout.iswa and run.swa is None:
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
        # the context's own rows (a view of the blob), not the universe's, which gathers on every read
        c.store.add(self.ctx, self.ctx_index[idx], self.cid[idx], self.media[idx])

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


def _gather(ctx: KVBlock, keep: np.ndarray, store, order: np.ndarray) -> KVBlock:
    """The context's cells `keep` and the stored cells, in `order` (indices into keep + stored): one
    block whose layers are gathered when read (`GatheredLayerKV`), so the universe is never held whole."""
    n_ctx = len(keep)
    src_ctx, src_store = order < n_ctx, order >= n_ctx
    at_ctx, at_store = np.flatnonzero(src_ctx), np.flatnonzero(src_store)
    from_ctx, from_store = keep[order[src_ctx]], order[src_store] - n_ctx

    def put(a_ctx: np.ndarray, a_store: np.ndarray | None) -> np.ndarray:
        out = np.empty((len(order),) + a_ctx.shape[1:], a_ctx.dtype)
        out[at_ctx] = a_ctx[from_ctx]
        if a_store is not None:
            out[at_store] = a_store[from_store]
        return out

    layers = [GatheredLayerKV(layer, il, store, put, len(order)) for il, layer in enumerate(ctx.layers)]
    ext = None if ctx.ext is None else put(ctx.ext, None if store is None else store.ext)
    return KVBlock(pos=put(ctx.pos, None if store is None else store.pos),
                   seq_id=np.zeros(len(order), np.int32), ext=ext, v_trans=ctx.v_trans, layers=layers)


class GatheredLayerKV(LazyLayerKV):
    """One layer of the universe: the context's rows and the store's (read from the file for a disk
    store), put in prefill order when read. Each read gathers anew: the planner, the packer and the
    writer take one layer at a time, so host memory holds a layer, not the store."""

    def __init__(self, ctx_layer, il: int, store, put, n_cells: int) -> None:
        self._ctx, self._il, self._store, self._put = ctx_layer, il, store, put
        self.k_type, self.v_type = ctx_layer.k_type, ctx_layer.v_type
        self.k_row, self.v_row, self.n_cells = ctx_layer.k_row, ctx_layer.v_row, n_cells

    @property
    def k(self) -> np.ndarray:
        return self._put(self._ctx.k, None if self._store is None else self._store.layer_rows(self._il, "k"))

    @property
    def v(self) -> np.ndarray:
        return self._put(self._ctx.v, None if self._store is None else self._store.layer_rows(self._il, "v"))


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
