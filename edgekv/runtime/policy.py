"""The compaction policy: which cells, which method, which window and which region, for one compaction.

- The candidates are the cache's (`CompressedCache.candidates`: pending media, or every unpacked cell
  with compress="all"; never the question window or the `pos_max` cell).
- With no question window, or before the question (`early`: media still coming in), `auto` and
  query-aware methods decode a probe window first (runtime/probe.py, docs/probe-windows.md); without
  one, a query-aware method gives way to `auto`'s query-agnostic pick.
- With a recall store and a question window captured on the compacted context, the question chooses
  among every cell, the store's included (runtime/recall.py).
- Early compaction of the last media chunk alone takes the `LastChunk` region (no whole-cache read, no
  rollback copy: dropping the turn's tail undoes it); everything else the whole sequence, whose blob
  becomes the turn's rollback point.
"""
from __future__ import annotations

from edgekv.errors import EdgeKVError
from edgekv.methods import Method, get_method, resolve_budget
from edgekv.runtime import recall
from edgekv.kv.codec import SeqState
from edgekv.runtime.compactor import CompactionReport
from edgekv.runtime.regions import write_or_restore
from edgekv.runtime.window_block import thin_window_block


def compact(session, method: str | Method | None, budget: float | int | str | None, early: bool,
            probe) -> CompactionReport | None:
    """One compaction of `session`'s candidates (Session.compact's body); the report is appended to
    `session.reports`. None: nothing to compact."""
    s = session
    cand = s.candidates()
    reselect = not early and recall.due(s.cache)
    if not cand.any() and not reselect:
        return None
    meth = s.method if method is None else (get_method(method) if isinstance(method, str) else method)
    if reselect:   # recall: the question chooses among every cell, the store's included
        r = recall.reselect(s, meth, budget, cand, s.recall_passes)
        if r is not None:
            s.reports.append(r)
        return r
    if (early or not s.cache.window_rows) and probe is not False:
        from edgekv.runtime import probe as probes

        r = probes.compact_with_probe(s, meth, budget, early, probe)
        if r is not probes.SKIPPED:
            return r
    if early and meth.needs_queries:
        meth = get_method("auto")  # resolves to its query-agnostic pick (no queries)
    budget_cells = resolve_budget(s.budget if budget is None else budget, int(cand.sum()))
    chunk = s.txns.lone_chunk(cand) if early else None
    r = None
    if chunk is not None:   # the last media chunk alone (no host copy)
        r = s.cache.compact(meth, budget_cells, chunk=chunk, use_queries=False, seed=s.seed, early=True)
    if r is None:
        r = s.cache.compact(meth, budget_cells, cand=cand, use_queries=not early, seed=s.seed, early=early,
                            on_blob=s.txns.stash, cap=early)
    if not early:
        s.cache.reselect_due = False   # the question's window chose these cells
    s.reports.append(r)
    return r


def thin_window(session) -> None:
    """Session(swa_budget<1): the question's window arrived and no compaction chose with it (the media was
    compacted chunk by chunk before it, or a follow-up turn): thin the sliding-window block alone
    (runtime/window_block.py), the blob read being the turn's rollback point."""
    c = session.cache
    c.swa_due = False
    blob = c.state_buffer()
    state = c.parse(blob, copy=False)
    rest, cells = thin_window_block(c, state.blocks[1:])
    if cells is None:
        return
    session.txns.stash(blob)
    write_or_restore(c, SeqState(state.seq_id, state.blocks[:1] + rest, state.has_ext), blob,
                     "thinned sliding-window block")


def check_probe(probe):
    """A probe is the question's text (or its tokens), True (the generic probe) or False (none); blank
    text or no tokens is none of these."""
    if isinstance(probe, bool):
        return probe
    if isinstance(probe, str) and not probe.strip() or not isinstance(probe, str) and not len(probe):
        raise EdgeKVError("the probe text is blank: pass the question's text, True for the generic probe or "
                          "False for none")
    return probe
