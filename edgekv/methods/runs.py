"""`hybridkv-runs`: any method's choice, widened to whole runs of neighbouring cells.

Not a paper method: an edgekv experiment for compaction before the question (docs/probe-windows.md,
"Tried, did not work"). A fact in a document is several tokens (a 5-digit pass key is 5 tokens
on Gemma 3); a per-token top-k driven by a generic probe can keep some of its digits and drop their
neighbours, and the fact is lost. Local-saliency pooling (SnapKV's avgpool, hybridkv's chunks) smooths
scores but still ranks single tokens. Here the unit kept is a run.

Per layer l and KV head h, with the inner method's plan keep[l, h] = s_1, s_2, ..., s_C (best first,
C cells per row):
    run(s)  = s, s-1, s+1, s-2, s+2, ..., s-r, s+r     (centre out; only candidate tokens in [0, T))
    keep'   = the first C distinct tokens of run(s_1), run(s_2), ...   (seed order, then run order)
So the best seeds keep up to 2r+1 neighbours each and the lowest-ranked seeds make room; runs that
touch merge. C, the per-head nominal budgets and the cell count are the inner plan's: same memory.
The inner plan's merges, if any, are dropped (a run plan is a plain gather).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgekv.methods.base import KVView, Method, Plan
from edgekv.methods.registry import get_method, register


def expand_runs(keep: np.ndarray, candidates: np.ndarray, radius: int) -> np.ndarray:
    """[..., C] best-first token indices -> [..., C]: the first C distinct tokens of each seed's run of
    +-radius candidate neighbours (centre out), seeds in order. radius 0 returns keep unchanged."""
    keep = np.asarray(keep, dtype=np.int64)
    if radius <= 0 or keep.shape[-1] == 0:
        return keep.copy()
    T, C = candidates.size, keep.shape[-1]
    offsets = np.array([0] + [s * j for j in range(1, radius + 1) for s in (-1, 1)], dtype=np.int64)
    rows = keep.reshape(-1, C)
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        e = (row[:, None] + offsets).ravel()                # seed-major, each run centre out
        e = e[(e >= 0) & (e < T)]
        e = e[candidates[e]]
        _, first = np.unique(e, return_index=True)          # first occurrence of every token
        out[i] = e[np.sort(first)][:C]                      # the seeds alone are C distinct tokens
    return out.reshape(keep.shape)


@dataclass
class Runs(Method):
    inner: str = "hybridkv"   # the method whose plan gives the seeds (registered name)
    radius: int = 2           # neighbours each side: a run is up to 2 * radius + 1 tokens (5: a 5-digit key)
    inner_kwargs: dict = field(default_factory=dict)

    paper = ""

    def __post_init__(self) -> None:
        if self.radius < 0:
            raise ValueError("radius must be >= 0")
        self._inner = get_method(self.inner, **self.inner_kwargs)
        self.name = f"{self.inner}-runs"
        self.needs_queries = self._inner.needs_queries     # instance attribute: probes and capture read it

    def plan(self, view: KVView, budget: int) -> Plan:
        base = self._inner.plan(view, budget)
        keep = expand_runs(base.keep, np.asarray(view.candidates, dtype=bool), self.radius)
        info = {**base.info, "method": self.name, "inner": base.info.get("method", self.inner),
                "radius": self.radius}
        return Plan(keep=keep, nominal=base.nominal, info=info).validate(view)


register("hybridkv-runs", lambda **kw: Runs(**{"inner": "hybridkv", **kw}))
