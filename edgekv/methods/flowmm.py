"""`flowmm`: FlowMM, cross-modal-information-flow-guided KV merging.

Paper: Li et al., "FlowMM: Cross-Modal Information Flow Guided KV Cache Merging for Efficient
Multimodal Context Inference", https://arxiv.org/abs/2511.05534 (no code released).

Per layer l (A = softmax attention of the captured window queries, GQA-averaged, W rows):
    rho^l = mean_{h, j in window} (attention mass of query j on keys of the *other* modality)
    strategy^l = cross-modal merging if rho^l >= theta (0.25) else intra-modal merging
Per layer l and KV head h, over the candidates:
    I(i)    = sum_{j in window} A[j -> i]                     (proxy-token importance, Eq. 8)
    pivots  = top-budget candidates by I (the kept slots)
    tau     = 0.9-quantile of I over the pivots; pivots with I > tau are protected (absorb nothing)
    each non-pivot i merges into argmax_{pivot p, I(p) <= tau} cos(k_i, k_p)   (Eq. 9-10)
        intra-modal layers: only pivots of the same modality and the same media item
        no such pivot: i is dropped
    merged slot = weighted mean of the pivot and its merged tokens, K and V alike

Reductions and reconstructed choices:
* rho (reconstructed reduction): the paper's Eq. 6-7 sum the cross-modal attention of *all* prefill
  queries; only the last W prompt queries are captured, so rho is the same ratio over those sampled
  rows: cross-modal mass / total mass (each row sums to 1). For a text window query the cross-modal
  mass is its attention on media keys; for a media query, on text keys. The image->text term of the
  paper is therefore only seen through window rows that are media tokens.
* proxy set P = the captured window (the paper: "a small subset of tokens near the end of the prompt").
* tau as the 0.9 quantile of the pivots' importances (the paper gives no value) (reconstructed).
* intra-modal = same modality and, for media, the same media index (image / frame) (reconstructed).
* merge weights (the paper leaves f_merge open) (reconstructed), `merge_weights`:
  "importance" (default): every token weighs its I (CaM / D2O-style attention weighting);
  "mean": every member weighs 1 (LOOK-M "averaged" merge);
  "pivot": LOOK-M's pivotal merge as in MixKV's `merge_kv`: each merged token i is first averaged
  with the pivot, (k_i + k_p)/2, then the slot takes the mean of k_p and those pairs, i.e. weights
  0.5 per merged token and 1 + 0.5 * n_merged for the pivot (pivot-dominant).
Merged post-RoPE keys mix positions, as in the merging baselines the paper compares to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgekv.methods.base import KVView, Method, Plan, check_budget, row_norms, top_k
from edgekv.methods.parallel import parallel_map
from edgekv.methods.registry import register

BLOCK_ELEMS = 1 << 21  # similarity block size (floats): bounds memory, keeps argmax in cache


def cross_modal_ratio(view: KVView) -> np.ndarray:
    """rho [L]: mean over KV heads and window queries of the attention mass on the other modality."""
    media_mass = view.window_media_mass                                 # [L, H, W]
    query_is_media = view.media_mask[view.n_tokens - view.window:]
    cross = np.where(query_is_media, 1.0 - media_mass, media_mass)
    return cross.mean(axis=(1, 2), dtype=np.float64)


def modality_groups(view: KVView) -> np.ndarray:
    """[T] int: 0 for text, media_index + 2 for the tokens of each media item."""
    groups = np.zeros(view.n_tokens, dtype=np.int64)
    for s in view.spans:
        if s.kind == "media":
            groups[s.start:s.stop] = s.media_index + 2
    return groups


def nearest(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """[m] index of the row of `pool` [k, d] with the largest dot product with each query [m, d]."""
    rows = max(1, BLOCK_ELEMS // max(pool.shape[0], 1))
    out = np.empty(queries.shape[0], dtype=np.int64)
    pool_t = np.ascontiguousarray(pool.T)
    for start in range(0, queries.shape[0], rows):
        out[start:start + rows] = np.argmax(queries[start:start + rows] @ pool_t, axis=1)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(row_norms(x), 1e-12)[..., None]


@register("flowmm")
@dataclass
class FlowMM(Method):
    theta: float = 0.25              # cross-modal ratio threshold (paper best 0.2-0.3)
    tau_quantile: float = 0.9        # pivots above this quantile of pivot importance are protected
    merge_weights: Literal["importance", "mean", "pivot"] = "importance"

    name = "flowmm"
    paper = "https://arxiv.org/abs/2511.05534"
    needs_queries = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.theta <= 1.0 or not 0.0 <= self.tau_quantile <= 1.0:
            raise ValueError("theta and tau_quantile must be in [0, 1]")
        if self.merge_weights not in ("importance", "mean", "pivot"):
            raise ValueError("merge_weights must be 'importance', 'mean' or 'pivot'")

    def plan(self, view: KVView, budget: int) -> Plan:
        budget = check_budget(budget, view.n_candidates)
        L, H, T = view.n_layers, view.n_kv_heads, view.n_tokens
        rho = cross_modal_ratio(view)
        importance = view.window_scores                                 # [L, H, T]
        keep = top_k(importance, view.candidates, budget)               # [L, H, B] pivots, best first
        groups = modality_groups(view)
        cand = np.flatnonzero(view.candidates)
        merge_to = np.full((L, H, T), -1, dtype=np.int64)

        def match(job: tuple[int, int], _: None) -> None:
            layer, head = job
            pivots = keep[layer, head]
            imp = importance[layer, head, pivots]
            open_slots = np.flatnonzero(imp <= np.quantile(imp, self.tau_quantile))
            is_pivot = np.zeros(T, dtype=bool)
            is_pivot[pivots] = True
            others = cand[~is_pivot[cand]]
            if others.size == 0:
                return
            if rho[layer] >= self.theta:  # cross-modal: any open pivot
                pairs = [(others, open_slots)]
            else:                         # intra-modal: open pivots of the same media item
                pairs = [(others[groups[others] == g], open_slots[groups[pivots[open_slots]] == g])
                         for g in np.unique(groups[others])]
            keys = view.keys[layer, head]
            for tokens, slots in pairs:
                if slots.size:            # else: no pivot of that modality is open, drop them
                    # argmax_p cos(k_i, k_p) = argmax_p k_i . k_p / |k_p|: only the pivots need normalising
                    merge_to[layer, head, tokens] = slots[nearest(keys[tokens], _unit(keys[pivots[slots]]))]

        parallel_map(match, [(layer, head) for layer in range(L) for head in range(H)])
        weight = self._weights(importance, keep, merge_to)
        return Plan(keep=keep, nominal=np.full((L, H), budget, np.int64), merge_to=merge_to,
                    merge_weight=weight,
                    info={"method": self.name, "rho": rho.tolist(),
                          "strategy": ["cross" if r >= self.theta else "intra" for r in rho],
                          "dropped": int(view.n_candidates * L * H - L * H * budget
                                         - (merge_to >= 0).sum())}).validate(view)

    def _weights(self, importance: np.ndarray, keep: np.ndarray, merge_to: np.ndarray) -> np.ndarray:
        merged = merge_to >= 0
        if self.merge_weights == "importance":
            weight = np.where(merged, importance, 0.0).astype(np.float32)
            np.put_along_axis(weight, keep, np.take_along_axis(importance, keep, axis=-1), axis=-1)
        elif self.merge_weights == "mean":
            weight = merged.astype(np.float32)
            np.put_along_axis(weight, keep, 1.0, axis=-1)
        else:  # pivot: LOOK-M pivotal merge
            weight = np.where(merged, 0.5, 0.0).astype(np.float32)
            L, H, C = keep.shape
            rows = np.arange(L * H)[:, None] * C
            counts = np.bincount((rows + merge_to.reshape(L * H, -1))[merged.reshape(L * H, -1)],
                                 minlength=L * H * C).reshape(L, H, C)
            np.put_along_axis(weight, keep, 1.0 + 0.5 * counts, axis=-1)
        return weight
