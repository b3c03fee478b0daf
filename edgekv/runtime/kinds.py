"""The ledger's words for cells, shared by the runtime's regions and its compaction pipeline.

- kind: PROTECTED (never a candidate: system text, the question, the pos_max cell), PENDING (media waiting
  for compaction), PACKED (a compaction's slot, or an original it kept as it was);
- cell id: every prefilled cell gets one (prefill order); a packed slot is COVERED when the recall store
  holds its originals (docs/recall.md), FROZEN when nothing does (recall off, or a loaded conversation).
"""
from __future__ import annotations

import numpy as np

from edgekv.methods import Span

PROTECTED, PENDING, PACKED = 0, 1, 2
COVERED, FROZEN = -1, -2   # a packed slot's cell id: its originals are in the recall store / are not
SCRATCH_SEQ = 1  # marks one media chunk for LastChunk (the context has 2 sequences, one cell pool)
EARLY = " (early, before the question)"

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
