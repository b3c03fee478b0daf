"""`pyramidkv`: SnapKV scores with a pyramid of layer budgets (more cells low, fewer high).

Paper: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", https://arxiv.org/abs/2406.02069 (schedule as in AdaKV's / MixKV's released code).

    min = budget // beta,  max = 2 * budget - min                   (beta = 20)
    if max > n_candidates: max = n_candidates, min = 2 * budget - max   (AdaKV code's clipping)
    b_l = max - l * (max - min) / (L - 1),  l = 0 .. L-1             (linear, decreasing)

mean_l b_l == budget exactly; the code's integer step `(max - min) // (L - 1)` is replaced by the real
step and largest-remainder rounding so the global budget is exact (reconstructed). Every KV head of a
layer gets the layer's budget. Cells used = b_0 (the first layer's budget); the other layers pad their
spare cells with their next-best tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, allocate
from edgekv.methods.registry import register
from edgekv.methods.snapkv import SnapKV


def pyramid_budgets(n_layers: int, n_heads: int, budget: int, n_candidates: int, beta: int = 20) -> np.ndarray:
    """[L, H] PyramidKV budgets: linear from max (layer 0) to min (last layer), mean == budget."""
    lo = budget // beta
    hi = 2 * budget - lo
    if hi > n_candidates:
        hi = n_candidates
        lo = 2 * budget - hi
    step = (hi - lo) / (n_layers - 1) if n_layers > 1 else 0.0
    schedule = hi - step * np.arange(n_layers)
    per_layer = allocate(schedule, n_layers * budget, lo=0, hi=n_candidates)
    return np.repeat(per_layer[:, None], n_heads, axis=1)


@register("pyramidkv")
@dataclass
class PyramidKV(SnapKV):
    beta: int = 20

    name = "pyramidkv"
    paper = "https://arxiv.org/abs/2406.02069"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError("beta must be >= 1")

    def budgets(self, view: KVView, budget: int, scores: np.ndarray) -> np.ndarray:
        return pyramid_budgets(view.n_layers, view.n_kv_heads, budget, view.n_candidates, self.beta)
