"""`knorm`: keep the keys with the smallest L2 norm.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024, https://arxiv.org/abs/2406.11430 (kvpress KnormPress).

score_{l,h}(i) = -||k_{l,h,i}||_2  (low-norm keys draw the most attention). Query-agnostic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, ScoreMethod, row_norms
from edgekv.methods.registry import register


@register("knorm")
@dataclass
class KNorm(ScoreMethod):
    name = "knorm"
    plans_on_chunk = True
    paper = "https://arxiv.org/abs/2406.11430"
    view_cells = "candidates"  # a per-token norm: protected tokens do not change a candidate's score
    reads_values = False

    def score(self, view: KVView) -> np.ndarray:
        return -row_norms(view.keys)
