"""`adakv`: SnapKV scores with head-adaptive budgets inside every layer.

Paper: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference", https://arxiv.org/abs/2407.11550 (AdaKV's released `AdaptiveSnapKVCluster`,
as MixKV's `init_adakv` configures it: floor 0.2, normalize on, no skipped layers).

Per layer l, with s_h the SnapKV scores of KV head h over the n candidates and b = budget:
    normalize: s_h <- s_h * (sum of the top-b of s_h) / (sum of s_h)
    c_h = how many of head h's tokens are in the layer's global top-(H_kv * b) of the s_h
    b_h = c_h * (1 - floor) + floor * b                     (floor = 0.2: every head keeps 20 % of b)
b_h is rounded by largest remainder so sum_h b_h == H_kv * b exactly (the code's `round` can miss the
total by a few cells) (reconstructed). Ties in the global top-k go to the earlier head.

What the formula implies: without normalisation a head whose attention is spread over many tokens
wins the global top-k over a peaked head once the peaked head's few large scores are taken, so it
gets more cells; normalisation scales a spread head down by its top-b mass share, so a head that is
spread *and* weak loses cells. Cells used = the largest b_h; smaller heads pad with their next-best.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, allocate
from edgekv.methods.registry import register
from edgekv.methods.snapkv import SnapKV


def adakv_budgets(scores: np.ndarray, candidates: np.ndarray, budget: int, floor: float = 0.2,
                  normalize: bool = True) -> np.ndarray:
    """[L, H] AdaKV head budgets from scores [L, H, T] (only candidates compete)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64)[..., candidates])  # [L, H, n]
    L, H, n = s.shape
    if normalize:
        top = -np.partition(-s, budget - 1, axis=-1)[..., :budget]
        mass = s.sum(axis=-1)
        s = s * np.where(mass > 0, top.sum(axis=-1) / np.where(mass > 0, mass, 1.0), 1.0)[..., None]
    # the layer's global top-(H * budget), ties to the earlier head/token (a stable sort's choice)
    flat = s.reshape(L, H * n)
    m = H * budget
    kth = -np.partition(-flat, m - 1, axis=-1)[:, m - 1:m]
    ties = flat == kth
    need = m - (flat > kth).sum(axis=-1, keepdims=True)
    win = (flat > kth) | (ties & (np.cumsum(ties, axis=-1) <= need))
    counts = win.reshape(L, H, n).sum(axis=-1)                                   # [L, H]
    wanted = counts * (1.0 - floor) + floor * budget
    return np.stack([allocate(w, H * budget, lo=0, hi=n) for w in wanted])


@register("adakv")
@dataclass
class AdaKV(SnapKV):
    floor: float = 0.2       # AdaKV's alpha_safeguard / floor_alpha
    normalize: bool = True   # scale each head by its top-budget mass share before the global top-k

    name = "adakv"
    paper = "https://arxiv.org/abs/2407.11550"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError("floor must be in [0, 1]")

    def budgets(self, view: KVView, budget: int, scores: np.ndarray) -> np.ndarray:
        return adakv_budgets(scores, view.candidates, budget, self.floor, self.normalize)
