"""Which cells of a sliding-window block to keep (iSWA models such as Gemma 3): SnapKV's window attention,
one choice shared by every sliding-window layer.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469 (window attention, pooled). Applied to the sliding-window layers, whose
cells share one position label that decides visibility (a cell leaves the window by its label), so the
block is never packed per layer or head: every layer keeps the same cells (docs/memory.md, "The
sliding-window block").

    a_l(i) = sum_{h, j in window, 0 <= p_j - p_i < n_swa} softmax_i(q_{l,h,j} . k_{l,g(h),i} * scale)
    s(i)   = maxpool_7( mean_l a_l(i) / sum_i a_l(i) )

g(h): the KV head query head h reads (GQA). Kept: every cell at or after the window's first position (the
question's own cells), then the highest s(i) until `keep` cells, in position order.
"""
from __future__ import annotations

import numpy as np

from edgekv.methods.base import pool1d

KERNEL = 7   # SnapKV's pooling width: a kept cell keeps its neighbours' chances (a number spans tokens)


def window_cell_scores(keys, positions: np.ndarray, queries: np.ndarray, q_positions: np.ndarray,
                       scale: float, n_swa: int, kernel: int = KERNEL) -> np.ndarray:
    """s(i) above for every cell: keys [L, H_kv, T, d] (or per-layer indexable), queries [L, H_q, W, d],
    positions [T], q_positions [W]."""
    L, Hq, W, _ = queries.shape
    T = len(positions)
    dist = q_positions[:, None].astype(np.int64) - positions[None, :].astype(np.int64)   # [W, T]
    visible = (dist >= 0) & (dist < n_swa)
    acc = np.zeros(T, np.float64)
    for il in range(L):
        k = np.asarray(keys[il], np.float32)                 # [H_kv, T, d]
        group = Hq // k.shape[0]
        logits = np.einsum("hwd,htd->hwt", queries[il], np.repeat(k, group, axis=0)) * scale
        logits = np.where(visible[None], logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=-1, keepdims=True)
        a = p.sum(axis=(0, 1))
        acc += a / max(float(a.sum()), 1e-30)
    return pool1d((acc / max(L, 1))[None], kernel, "max")[0]


def swa_keep(keys, positions: np.ndarray, queries: np.ndarray, q_positions: np.ndarray, scale: float,
             n_swa: int, keep: int, kernel: int = KERNEL) -> np.ndarray:
    """The sorted cell indices to keep (at least the window's own cells, at most all of them)."""
    positions = np.asarray(positions, np.int64)
    T = len(positions)
    own = positions >= int(np.min(q_positions))
    if keep >= T:
        return np.arange(T)
    s = window_cell_scores(keys, positions, queries, q_positions, scale, n_swa, kernel)
    s = np.where(own, np.inf, s)
    chosen = np.argsort(-s, kind="stable")[:max(keep, int(own.sum()))]
    return np.sort(chosen)
