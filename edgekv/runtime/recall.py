"""Recall: each question chooses its cells again, among the context's and the store's (docs/recall.md).

With a recall store (`Session(recall="ram"|"disk")`), compaction keeps the original rows of every cell it
packs (`edgekv.kv.store`). When a question's window has been captured on the compacted context, the
conversation's method scores every cell, in the context and in the store (the `Universe` region of
runtime/compactor.py), filling as many cells as the context holds now (`slots_for`):

- the chosen set is the context's: nothing is written (the report says `rewritten=False`);
- the cells that would come back hold under `recall_min_share` of every KV head's window attention on its
  chosen cells (`info["recall_share"]`, the largest): the context stays as it is, likewise;
- otherwise the context is rewritten with it (cells coming back at their true positions, cells leaving
  to the store). When stored cells came back, the question's own cells (the text run since the last
  media or answer) are removed exactly and prefilled again, so they see the new context; with passes=2
  the re-captured window chooses once more.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from edgekv.kv.store import RecallStoreError
from edgekv.methods import resolve_budget
from edgekv.runtime.compactor import CompactionReport
from edgekv.runtime.kinds import FROZEN, PACKED

# Session(recall_min_share=): cells come back only when some KV head would get this share of the window's
# attention on its chosen cells from them (docs/recall.md, "When nothing needs to come back")
DEFAULT_MIN_SHARE = 0.1


def due(cache) -> bool:
    """A question window was captured with a store holding cells, and nothing chose with it yet."""
    return bool(cache.store is not None and cache.reselect_due and cache.window_rows and cache.store.n)


def slots_for(cache, want, cand: np.ndarray) -> int:
    """The cells a re-selection may fill: the packed cells the context holds now (what the compactions
    before it kept, lowered budgets included) plus the budget's share of the new candidates. The
    context never grows: recall changes which cells it holds, not how many."""
    held = int(((cache.kind == PACKED) & (cache.cid != FROZEN)).sum())
    return held + (resolve_budget(want, int(cand.sum())) if cand.any() else 0)


def reselect(session, meth, budget, cand: np.ndarray, passes: int = 1) -> CompactionReport | None:
    """Choose among every cell with the question's window (see the module docstring). A store that
    cannot be read (its file gone or changed) is dropped, with a warning on stderr and the reason in
    `session.recall_error`: the conversation goes on without recall of what it held (a plain compaction
    of the candidates, if any)."""
    s, c = session, session.cache
    t0 = time.perf_counter()
    report: CompactionReport | None = None
    passes = max(1, passes)
    for i in range(passes):
        if i:
            cand = s.candidates()
        want = s.budget if budget is None else budget
        run = c.run
        try:
            r = c.compact(meth, slots_for(c, want, cand), cand=cand, use_queries=True,
                          seed=s.seed, on_blob=s.txns.stash, universe=True, cap=True)
        except RecallStoreError as e:
            c.forget_store()
            s.recall_error = str(e)
            print(f"warning: {e}; going on without recall of the cells it held", file=sys.stderr)
            r = None
            if cand.any():
                r = c.compact(meth, resolve_budget(want, int(cand.sum())), cand=cand, use_queries=True,
                              seed=s.seed, on_blob=s.txns.stash)
                r.info["recall_error"] = str(e)
            report = r
            break
        if r.reprefill_tokens:    # the question's cells were left out: prefill them on the new context
            t1 = time.perf_counter()
            # the window is captured again only when another pass chooses with it (capture costs a decode)
            s.prefiller.tokens_in(list(run.tokens[-r.reprefill_tokens:]), capture=i + 1 < passes)
            r.info["reprefill_s"] = round(time.perf_counter() - t1, 4)
            r.cells_after, r.bytes_after = c.n_cells, c.nbytes()
        if report is not None:    # a later pass: one report for the whole re-selection
            r.recalled += report.recalled
            r.reprefill_tokens += report.reprefill_tokens
            r.rewritten = r.rewritten or report.rewritten
            r.cells_before, r.bytes_before = report.cells_before, report.bytes_before
        report = r
        if not r.reprefill_tokens:
            break
    c.reselect_due = False
    if report is not None:
        report.seconds = time.perf_counter() - t0
        report.info["reselect_s"] = round(report.seconds, 4)
    return report
