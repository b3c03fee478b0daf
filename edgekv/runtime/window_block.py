"""Session(swa_budget=f): an iSWA model's sliding-window block cut to a share of its cells when the cache is
compacted with a question's window (docs/memory.md, "The sliding-window block").

Gemma 3 keeps 15 of its 18 layers in a sliding window of 512 positions; the method's budget applies to the
global layers only, so below about 1k tokens the window block is most of the cache's bytes. With
`swa_budget` under 1 the window block keeps that share of its cells (never fewer than the question's own),
the same cells in every window layer (edgekv.methods.swa), chosen with the question's queries in those
layers. Without a captured window (a compaction before the question, or a probe, whose window block is
put back afterwards) the block stays whole; a question that no compaction chose with (a streamed clip
compacted chunk by chunk, a follow-up turn) thins it alone before its first token (policy.thin_window).
"""
from __future__ import annotations

import numpy as np

from edgekv.kv.packer import LayerFloats
from edgekv.methods.swa import swa_keep


def thin_window_block(cache, rest: list) -> tuple[list, tuple[int, int] | None]:
    """`rest` (the state's blocks after the global one) with the window block thinned, and its cell
    counts (before, after); (rest, None) when nothing applies."""
    f, q, w = cache.swa_budget, cache.window_q_swa, cache.window_rows
    if f >= 1.0 or not rest or q is None or not w or q.shape[2] != w or not rest[0].n_cells:
        return rest, None
    cache.swa_due = False          # this window has chosen (policy.thin_window need not)
    lay, block = cache.model.layout, rest[0]
    keep = max(1, int(round(f * block.n_cells)))
    if keep >= block.n_cells:
        return rest, None
    K = LayerFloats(block, lay.n_head_kv, None, "k")   # a layer of floats at a time, as the scores read them
    idx = swa_keep(K, block.pos, q, np.arange(cache.n_past - w, cache.n_past), lay.attn_scale, lay.n_swa, keep)
    return [block.take(idx)] + rest[1:], (block.n_cells, len(idx))
