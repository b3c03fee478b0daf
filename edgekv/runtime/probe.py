"""Probe windows: queries for a question that has not come yet (docs/probe-windows.md).

When compaction must happen before the question (between frames or tiles, before the user types, for
follow-up questions), query-aware methods have no observation window. A probe fills in: decode a short
text after the media at the next positions with query capture armed, use its queries as the window,
compact, then remove the probe's cells exactly:

- plain caches: `llama_memory_seq_rm(mem, 0, p0, -1)` (exact: logits bit-identical to no probe);
- iSWA caches (Gemma 3): the sliding-window block keeps only the last window of positions, so decoding the
  probe evicted SWA cells the question still needs and `seq_rm` cannot bring them back. Keep the SWA
  block's bytes from before the probe and, after compaction, write back the global block without the
  probe's cells together with that SWA block through the state blob.

The probe is the user's question when it is known (one-shot `-p`, a captioning prompt, a server request),
else `GENERIC_PROBE`. Measured on Gemma 3 270M (docs/probe-windows.md, "Measured"): which generic text
barely matters; a known question recovers the question-after numbers.
"""
from __future__ import annotations

import time
from typing import Sequence, Union

import numpy as np

from edgekv.errors import CompactionError
from edgekv.kv.codec import SeqState, state_buffer
from edgekv.runtime import lib
from edgekv.runtime.lib import llama_cpp

# docs/probe-windows.md: short generic probes score about the same (this one 0.68 / 0.32, "Repeat the
# previous context:" 0.66 / 0.27 of full at 0.25 / 0.1: within noise).
GENERIC_PROBE = "\n\nWhat are the important facts, numbers, codes and names in the text above?"

Probe = Union[str, Sequence[int], bool, None]
SKIPPED = object()  # compact_with_probe could not probe (no capture, no room): the caller goes on without


def question_probe(text: str | None) -> str | bool:
    """The probe for a question known before the media are read (a caption prompt, a server request's
    last user message): its text as given, or the generic probe (True) when there is no text to probe with."""
    return text if text and text.strip() else True


def wants_probe(method) -> bool:
    """Query-aware methods and `auto` (which then picks per regime) profit from a probe window."""
    return bool(getattr(method, "needs_queries", False) or hasattr(method, "resolve"))


def probe_tokens(session, probe: Probe) -> tuple[list[int], bool]:
    """(tokens, known): the probe's tokens and whether it is the user's own question."""
    if probe is True or probe is None:
        return session.model.tokenize(GENERIC_PROBE, add_bos=False, special=False), False
    if isinstance(probe, str):
        return session.model.tokenize(probe, add_bos=False, special=False), True
    return [int(t) for t in probe], True


def compact_with_probe(session, method, budget, early: bool, probe: Probe):
    """Compact `session` with a probe window; returns the CompactionReport (None: nothing to do), or
    SKIPPED when no probe is wanted or can run (query-agnostic method, query capture off, probe longer
    than a batch, no room)."""
    from edgekv.methods import resolve_budget
    from edgekv.runtime.cache import PROTECTED

    s = session
    c = s.cache
    cap = s.model.capture
    if not wants_probe(method):
        return SKIPPED
    toks, known = probe_tokens(s, probe)
    n = len(toks)
    if cap is None or n == 0 or n > s.model.n_batch or c.n_cells + n > s.model.n_ctx or not c.n_cells:
        return SKIPPED
    auto = hasattr(method, "resolve")
    if auto:   # `auto`: its pick for this regime (question known or not)
        method = method.for_probe(known)
    t0 = time.perf_counter()
    p0, n0 = c.n_past, c.n_cells
    saved = (c.logits, c.window_q, c.window_rows, c.logits_after_media, c.window_q_swa)
    last_kind = int(c.kind[-1])
    # The last media chunk alone (the LastChunk region, runtime/compactor.py): no whole-cache read, and no rollback
    # blob, since every cell it rewrites lies after the turn's start (dropping the turn's tail undoes it).
    chunk = s.txns.lone_chunk(c.candidates(s.compress)) if method.plans_on_chunk else None
    if chunk is None:
        blob = c.state_buffer()   # no bytes copy; parsed as views into it (as the compactor does)
        s.txns.stash(blob)   # a turn rolled back after this compaction returns to before the probe
        before = c.parse(blob, copy=False)
        swa = before.blocks[1] if s.model.layout.iswa else None
        bytes_before = before.nbytes
        del blob, before
    else:
        swa, bytes_before = None, n0 * s.model.cell_bytes
    t_read = time.perf_counter() - t0

    t1 = time.perf_counter()
    c.decode(toks, "none", capture_rows=n)
    c.add_cells(n, PROTECTED)
    q = cap.window(s.model.layout.global_layers)
    c.window_q, c.window_rows = q, (n if q is not None else 0)
    c.window_q_swa = None          # the window block is put back after the probe: nothing to thin
    probe_s = time.perf_counter() - t1
    # After removal the media's last cell is the sequence's pos_max again: it must survive compaction.
    c.kind[n0 - 1] = PROTECTED
    report = None
    try:
        if q is not None:
            cand = c.candidates(s.compress)
            if cand.any():
                cells = resolve_budget(s.budget if budget is None else budget, int(cand.sum()))
                if chunk is not None:
                    report = c.compact(method, cells, chunk=chunk, use_queries=True, seed=s.seed, early=early)
                if report is None:
                    report = c.compact(method, cells, cand=cand, use_queries=True, seed=s.seed, early=early,
                                       on_blob=s.txns.stash if chunk is not None else None, cap=early)
    finally:
        t2 = time.perf_counter()
        remove_probe(s, p0, n, swa)
        if report is None or not report.chunk_only:
            c.kind[-1] = last_kind             # the pos_max cell: a candidate again next time
        c.logits, c.window_q, c.window_rows, c.logits_after_media, c.window_q_swa = saved
        remove_s = time.perf_counter() - t2
    if q is None:
        return SKIPPED
    if report is not None:
        report.auto, report.probe = auto, "question" if known else "generic"
        # the report describes the cache without the probe
        report.cells_before, report.cells_after = n0, c.n_cells
        report.bytes_before = bytes_before
        report.bytes_after = c.n_cells * s.model.cell_bytes if report.chunk_only else c.nbytes()
        report.info.update(probe_tokens=n, probe_known=known, probe_s=round(probe_s, 4),
                           probe_remove_s=round(remove_s + t_read, 4))
        report.seconds += probe_s + remove_s + t_read
        s.reports.append(report)
    return report


def remove_probe(session, p0: int, n: int, swa_before) -> None:
    """Drop the probe's n cells (positions >= p0) exactly; see the module docstring."""
    c = session.cache
    if swa_before is None:
        mem = llama_cpp.llama_get_memory(c.model.ctx)
        if not llama_cpp.llama_memory_seq_rm(mem, 0, p0, -1):
            raise CompactionError(f"llama.cpp refused to remove the probe's cells:\n{lib.recent_log()}")
    else:
        blob = c.state_buffer()
        st = c.parse(blob, copy=False)
        base = st.blocks[0]
        keep = np.flatnonzero(base.pos < p0)
        new = SeqState(st.seq_id, [base.take(keep), swa_before], st.has_ext)
        if not c.set_state(state_buffer(new)):
            restored = c.set_state(blob)
            raise CompactionError("llama.cpp refused the cache without the probe"
                                  + ("" if restored else " AND the original could not be restored: call clear()")
                                  + f":\n{lib.recent_log()}")
    c.forget_last(n)
    c.n_past = p0
