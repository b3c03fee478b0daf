"""One compaction pipeline: read a region's cells, let a method plan, pack, write back, settle the ledger.

The regions (runtime/regions.py, runtime/universe.py) say what one compaction rewrites: the whole
sequence, the last media chunk alone, or (recall) every cell in the context and in the store. All go
through `compact()`: resolve `auto`, read, plan on the view the method asks for, pack
(`edgekv.kv.packer`), write, and update the cache's ledger (kind, media index, position and cell id of
every cell). The report has typed fields; `method` is only the label people read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgekv.errors import EdgeKVError
from edgekv.kv.packer import LayerFloats, layer_floats, pack_block
from edgekv.methods import KVView, Method, Span
from edgekv.methods.parallel import planning_threads
from edgekv.runtime import lib


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
    rewritten = True
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
        lib.release_free_memory()   # what reading and viewing the region freed: not under planning's peak
        t1 = time.perf_counter()
        with planning_threads(model.threads):
            plan = meth.plan(view, slots) if region.wants_plan(meth, slots, view.n_candidates) else None
        if plan is not None and region.cap:
            plan = plan.capped(slots)   # a context sized for the budget: never more cells than it
        plan_s = time.perf_counter() - t1
        lib.release_free_memory()   # planning's temporaries (the planning threads' arenas too) leave the peak
        n_candidates, bytes_before = region.counts()
        if plan is None:  # the budget covers everything: keep the cells as they are
            region.keep_as_is()
        else:
            plan, merged = _cells_and_merges(meth, view, cells, plan, base, lay.n_head_kv)
            region.planned(view, cells)
            del view
            new_base, src = pack_block(base, plan, region.cand, lay.n_head_kv, merged)
            if region.unchanged(new_base):   # the context already holds this choice: write nothing
                rewritten = False
                region.release()
            else:
                region.recalled_n = region.recalled(new_base, src, plan)
                if region.not_worth_it():    # what would come back carries too little attention
                    rewritten, region.recalled_n = False, 0
                    region.release()
                else:
                    region.store_originals()
                    region.write(new_base)
                    region.settle(src, new_base.pos)
    except BaseException:
        region.release()
        if store is not None:
            store.truncate(store_n0)
        raise
    return CompactionReport(
        resolved=meth.name, auto=auto, early=early, chunk_only=region.chunk_only, budget_cells=budget_cells,
        n_candidates=n_candidates, cells_before=cells_before, cells_after=cache.n_cells,
        bytes_before=bytes_before, bytes_after=region.bytes_after,
        seconds=time.perf_counter() - t0, plan_seconds=plan_s,
        nominal_mean=float(plan.nominal.mean()) if plan is not None else float(budget_cells),
        nominal_max=int(plan.nominal.max()) if plan is not None else budget_cells,
        merged=plan is not None and plan.merge_to is not None, window=window,
        info=(dict(plan.info) if plan is not None else {}) | region.extra_info(),
        store_cells=0 if store is None else store.n, store_bytes=0 if store is None else store.nbytes,
        store_where=None if store is None else store.where, reselect=region.reselect,
        recalled=region.recalled_n, rewritten=rewritten,
        reprefill_tokens=0 if region.cut is None else len(region.cut.tokens))


def method_view(meth: Method, base, n_kv_heads: int, cand: np.ndarray, spans: tuple[Span, ...], queries,
                scale: float, seed: int, rope: tuple[float, bool] | None = None, window_outside: bool = False,
                key_rotation: np.ndarray | None = None) -> tuple[KVView, np.ndarray | None]:
    """The view `meth` plans on, converting to float32 only what it reads (Method.view_cells,
    reads_keys, reads_values; a layer at a time where it reads by layer), and the cells it covers (None:
    all, in order). window_outside: a view of the candidates alone, with the window's queries (as a
    LastChunk plans). key_rotation: llama.cpp's rotation of a quantized K cache (KVView.key_rotation)."""
    cells = np.flatnonzero(cand) if meth.view_cells == "candidates" or window_outside else None
    # floats made a layer at a time as the method reads them (LayerFloats), not the whole block at once
    K = LayerFloats(base, n_kv_heads, cells, "k") if meth.reads_keys else None
    V = LayerFloats(base, n_kv_heads, cells, "v") if meth.reads_values else None
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
