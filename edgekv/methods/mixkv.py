"""`mixkv`, `mixkv-adakv`, `mixkv-pyramidkv`: MixKV, a head-wise mix of importance and diversity.

Paper: Liu et al., "Mixing Importance with Diversity: Joint Optimization for KV Cache Compression in
Large Vision-Language Models", ICLR 2026, https://arxiv.org/abs/2510.20707
(code https://github.com/xuyang-liu16/MixKV, `SELECT_METHOD=headwisemixkv`).

Per layer l and KV head h, over the n candidate tokens:
    a_i     = avgpool_5( mean_{j in window} softmax(q_j K^T * scale)_i ), GQA mean   (SnapKV, W = 32)
    scaled(x) = minmax(x) * mean(a) / (mean(minmax(x)) + 1e-8)
    imp_i   = a_i + scaled(||v_i||)                                  (VNorm, intrinsic importance)
    div_i   = scaled(-cos(k_i, m̄)),  m̄ = mean_i k_i / ||k_i||       (KeyDiff-style diversity)
    r       = (n ||m̄||^2 - 1) / (n - 1)                              (mean pairwise key cosine)
    score_i = (1 - r) * imp_i + r * div_i

r is computed online for this input, as the paper's ablation prefers (the released code reads an
offline Qwen2-VL table instead); it is computed over the candidate tokens, like m̄ (the code's mean
includes the window tokens) (reconstructed), and clipped to [0, 1] (reconstructed). minmax of a
constant vector is 0 (reconstructed).

The wrapped allocator decides the budgets, the mixed score picks the tokens inside each head:
`mixkv` = SnapKV (uniform), `mixkv-adakv` = AdaKV budgets from the attention score alone (as the
code does), `mixkv-pyramidkv` = PyramidKV layer schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.adakv import AdaKV
from edgekv.methods.base import KVView, row_norms
from edgekv.methods.keydiff import key_diversity
from edgekv.methods.pyramidkv import PyramidKV
from edgekv.methods.registry import register
from edgekv.methods.snapkv import SnapKV, snapkv_scores


def scaled_minmax(x: np.ndarray, target_mean: np.ndarray) -> np.ndarray:
    """[L, H, n] min-max normalised per row, then rescaled so its mean is target_mean [L, H]."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    span = hi - lo
    z = (x - lo) / np.where(span > 0, span, 1.0)
    return z * (target_mean / (z.mean(axis=-1) + 1e-8))[..., None]


def mixkv_scores(view: KVView, attn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mixed score [L, H_kv, T] (0 off the candidates) from the pooled attention, and r [L, H_kv]."""
    cand = view.candidate_index
    a = attn[..., cand].astype(np.float64)
    a_mean = a.mean(axis=-1)
    cos, r = key_diversity(view)
    vn = scaled_minmax(row_norms(view.values)[..., cand], a_mean)
    div = scaled_minmax(-cos[..., cand], a_mean)
    a += vn                                          # in place: these [L, H, n] float64 temporaries
    a *= (1.0 - r)[..., None]                        # cost more than the arithmetic
    div *= r[..., None]
    a += div
    out = np.zeros(attn.shape, dtype=np.float64)
    out[..., cand] = a
    return out, r


@register("mixkv")
@dataclass
class MixKV(SnapKV):
    name = "mixkv"
    paper = "https://arxiv.org/abs/2510.20707"
    reads_values = True  # the value norms

    def score(self, view: KVView) -> np.ndarray:
        return mixkv_scores(view, snapkv_scores(view, self.kernel_size, self.pooling))[0]


@register("mixkv-adakv")
@dataclass
class MixKVAdaKV(MixKV, AdaKV):
    name = "mixkv-adakv"

    def budgets(self, view: KVView, budget: int, scores: np.ndarray) -> np.ndarray:
        # AdaKV allocates on the attention score alone; the mixed score only picks tokens (MixKV code).
        return super().budgets(view, budget, snapkv_scores(view, self.kernel_size, self.pooling))


@register("mixkv-pyramidkv")
@dataclass
class MixKVPyramidKV(MixKV, PyramidKV):
    name = "mixkv-pyramidkv"
