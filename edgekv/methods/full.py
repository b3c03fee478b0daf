"""`full`: keep every cell (the reference every other method is measured against)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, Plan, ScoreMethod
from edgekv.methods.registry import register


@register("full")
@dataclass
class Full(ScoreMethod):
    """No compression: the plan keeps all candidates whatever the budget (used as the baseline)."""

    name = "full"
    paper = ""
    view_cells = "candidates"
    reads_keys = reads_values = False

    def score(self, view: KVView) -> np.ndarray:
        # Earlier tokens first, so the plan is the identity order.
        return np.broadcast_to(-np.arange(view.n_tokens, dtype=np.float64),
                               (view.n_layers, view.n_kv_heads, view.n_tokens))

    def plan(self, view: KVView, budget: int) -> Plan:
        return super().plan(view, view.n_candidates) if view.n_candidates else Plan(
            keep=np.zeros((view.n_layers, view.n_kv_heads, 0), np.int64),
            nominal=np.zeros((view.n_layers, view.n_kv_heads), np.int64))
