"""`keydiff`: keep the keys that point away from the head's average key direction.

Paper: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
in Resource-Constrained Environments", https://arxiv.org/abs/2504.15364 (kvpress KeyDiffPress).

    k̂_i = k_i / ||k_i||,   m̄ = mean_{i in candidates} k̂_i   (per layer and KV head)
    score_{l,h}(i) = -cos(k_i, m̄)

Query-agnostic. The anchor m̄ is averaged over the candidate tokens only, the span being compressed
(kvpress averages over every key it is given) (reconstructed). A zero key has cosine 0 with
everything, as in torch's F.normalize / cosine_similarity with eps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, ScoreMethod
from edgekv.methods.parallel import parallel_map
from edgekv.methods.registry import register

EPS = 1e-12


def key_diversity(view: KVView) -> tuple[np.ndarray, np.ndarray]:
    """cos [L, H_kv, T] between each key and its head's mean normalised candidate key, and the head
    redundancy r [L, H_kv] = mean pairwise cosine between distinct candidate keys, clipped to [0, 1].

    r is MixKV's O(T) identity r = (||sum_i k̂_i||^2 - sum_i ||k̂_i||^2) / (n (n - 1)), which is
    (n ||m̄||^2 - 1)/(n - 1) when no key is zero. One pass of row norms plus two einsum mat-vecs (np.matmul's
    stacked mat-vec path was 10x slower).
    """
    keys, n = view.keys, view.n_candidates
    norms = np.empty(keys.shape[:3], dtype=np.float32)                      # [L, H, T]
    inv = np.empty(keys.shape[:3], dtype=np.float32)                        # 1/|k|, 0 off candidates
    total = np.empty(keys.shape[:2] + keys.shape[3:], dtype=np.float32)     # [L, H, d] sum of k̂
    dots = np.empty(keys.shape[:3], dtype=np.float32)                       # [L, H, T] k_i . m̄
    protected = ~view.candidates

    def one_layer(layer: int, _: None) -> None:  # three passes over one layer's keys while cached
        k = keys[layer]
        np.sqrt(np.einsum("htd,htd->ht", k, k), out=norms[layer])
        np.divide(1.0, np.maximum(norms[layer], EPS), out=inv[layer])
        inv[layer][:, protected] = 0.0
        np.einsum("ht,htd->hd", inv[layer], k, out=total[layer])
        np.einsum("htd,hd->ht", k, total[layer] / max(n, 1), out=dots[layer])

    parallel_map(one_layer, range(keys.shape[0]))
    safe = np.maximum(norms, EPS)
    mean = total / max(n, 1)
    cos = dots / (safe * np.maximum(np.linalg.norm(mean, axis=-1), EPS)[..., None])
    self_sim = np.where(view.candidates, (norms * inv) ** 2, 0.0).sum(axis=-1)  # n unless zero keys
    sq = np.einsum("lhd,lhd->lh", total, total, dtype=np.float64)
    r = (sq - self_sim) / (n * (n - 1)) if n > 1 else np.zeros_like(sq)
    return cos.astype(np.float32, copy=False), np.clip(r, 0.0, 1.0)


@register("keydiff")
@dataclass
class KeyDiff(ScoreMethod):
    name = "keydiff"
    plans_on_chunk = True
    paper = "https://arxiv.org/abs/2504.15364"
    reads_values = False  # all cells: the sums run over T (protected rows zeroed), so T fixes the bits

    def score(self, view: KVView) -> np.ndarray:
        return -key_diversity(view)[0]
