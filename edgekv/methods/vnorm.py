"""`vnorm`: keep the tokens whose values have the largest L2 norm.

The intrinsic-importance term of MixKV (Liu et al., arXiv 2510.20707, ablation: VNorm > KNorm),
used alone: score_{l,h}(i) = ||v_{l,h,i}||_2. Query-agnostic. (MixKV's own `vnorm` variant adds it to
the SnapKV attention; here it is the plain norm, as a query-free baseline.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, ScoreMethod, row_norms
from edgekv.methods.registry import register


@register("vnorm")
@dataclass
class VNorm(ScoreMethod):
    name = "vnorm"
    paper = "https://arxiv.org/abs/2510.20707"
    view_cells = "candidates"
    reads_keys = False

    def score(self, view: KVView) -> np.ndarray:
        return row_norms(view.values)
