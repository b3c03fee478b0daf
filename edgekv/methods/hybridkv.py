"""`hybridkv`: HybridKV, static heads pruned with a text prior, dynamic heads kept as whole chunks.

Paper: Zeng et al., "HybridKV: Hybrid KV Cache Compression for Efficient Multimodal Large Language
Model Inference", ACL 2026, https://arxiv.org/abs/2604.05887 (no code; low-confidence summaries).

Per layer l and KV head h, over the n candidates:
    a       = text-centric attention: window attention averaged over the window (question) queries,
              renormalised over the candidates (reconstructed)
    k90     = smallest k whose top-k mass of a >= theta (0.9)   (mass-coverage reading of theta)
    type    = static if k90 <= budget else dynamic              (reconstructed reading)
Budgets (top-down), total = L * H_kv * budget:
    B_dyn   = r * total * n_dyn / (n_dyn + n_stat), B_stat = total - B_dyn
              (r = 1: each type gets its head-count share; r > 1 favours dynamic heads) (reconstructed)
    dynamic heads: B_dyn split uniformly; static heads: B_stat in proportion to their density
              1 - sparsity = k90 / n, with a floor of 0.2 * budget, capped at n (reconstructed)
Selection:
    static  = text-prior pruning: candidate text tokens first (by a), then media tokens by pooled a
              (avgpool 5, SnapKV-style local saliency)
    dynamic = whole chunks of `chunk` consecutive candidate tokens ranked by their attention mass a;
              floor(b_h / chunk) chunks (a shorter last chunk counts its real size), the remainder of
              b_h filled by the best single tokens (reconstructed)

Reduction: the paper keeps a dynamic head's chunks in host memory and fetches the top chunks for each
decoding query. llama.cpp attends over the cells it holds and cannot fetch per step, so the chunk
choice is made once at prefill with the question window's attention: the chunk-wise selection is
what survives of chunk retrieval. Cells used = the largest head budget; smaller heads pad with their
next-best tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, Method, Plan, allocate, check_budget, pool1d, top_k
from edgekv.methods.registry import register


def coverage_k(attn: np.ndarray, theta: float) -> np.ndarray:
    """[...] smallest k whose k largest entries of each row of attn [..., n] hold >= theta of its mass."""
    a = np.sort(attn, axis=-1)[..., ::-1]
    mass = np.cumsum(a, axis=-1)
    total = mass[..., -1:]
    uniform = total[..., 0] <= 0
    reached = mass >= theta * np.where(uniform[..., None], 1.0, total) * (1 - 1e-12)
    k = reached.argmax(axis=-1) + 1
    return np.where(uniform, int(np.ceil(theta * attn.shape[-1])), k)


@register("hybridkv")
@dataclass
class HybridKV(Method):
    theta: float = 0.9        # attention-mass coverage that defines a head's sparsity
    r: float = 1.0            # dynamic-vs-static split coefficient (reconstructed default)
    chunk: int = 32           # chunk size of dynamic heads
    floor: float = 0.2        # minimum static-head budget, fraction of the budget (reconstructed)
    kernel_size: int = 5      # avgpool for the static heads' media ranking

    name = "hybridkv"
    plans_on_chunk = True
    paper = "https://arxiv.org/abs/2604.05887"
    needs_queries = True
    reads_values = False

    def __post_init__(self) -> None:
        if not 0.0 < self.theta <= 1.0:
            raise ValueError("theta must be in (0, 1]")
        if self.r < 0 or self.chunk < 1 or self.kernel_size < 1 or not 0.0 <= self.floor <= 1.0:
            raise ValueError("r >= 0, chunk >= 1, kernel_size >= 1 and floor in [0, 1]")

    def plan(self, view: KVView, budget: int) -> Plan:
        budget = check_budget(budget, view.n_candidates)
        L, H, n = view.n_layers, view.n_kv_heads, view.n_candidates
        cand = view.candidate_index
        ws = view.window_scores

        def attn(layer: int) -> np.ndarray:      # [H, n] text-centric attention, float64, one layer
            return ws[layer][..., cand].astype(np.float64) / view.window

        # A layer at a time: over recall's universe (every stored cell) the [L, H, n] float64 arrays
        # were the re-selection's largest temporaries (docs/recall.md, "Memory")
        k90 = np.stack([coverage_k(attn(layer), self.theta) for layer in range(L)])
        static = k90 <= budget
        nominal = self._budgets(static, k90, budget, n)
        text = ~view.media_mask[cand]
        width = int(nominal.max())
        keep = np.empty((L, H, width), np.int64)
        for layer in range(L):
            a = attn(layer)
            scores = np.zeros((H, view.n_tokens))
            # static: text first (tier 2), then media by pooled attention (pooled over the candidate run)
            scores[..., cand] = np.where(static[layer][:, None], np.where(text, 2.0 + a, pool1d(a, self.kernel_size)),
                                         0.0)
            for head in np.flatnonzero(~static[layer]):
                scores[head, cand] = self._chunk_scores(a[head], int(nominal[layer, head]))
            keep[layer] = top_k(scores, view.candidates, width)
        return Plan(keep=keep, nominal=nominal,
                    info={"method": self.name, "static": static.tolist(), "k90": k90.tolist()}).validate(view)

    def _budgets(self, static: np.ndarray, k90: np.ndarray, budget: int, n: int) -> np.ndarray:
        total, n_dyn, n_stat = static.size * budget, int((~static).sum()), int(static.sum())
        b_dyn = int(round(self.r * total * n_dyn / static.size))
        b_dyn = min(max(b_dyn, total - n_stat * n), n_dyn * n)   # each side within its heads' capacity
        nominal = np.zeros(static.shape, dtype=np.int64)
        if n_dyn:
            nominal[~static] = allocate(np.ones(n_dyn), b_dyn, hi=n)
        if n_stat:
            b_stat = total - b_dyn
            lo = min(int(self.floor * budget), b_stat // n_stat)
            nominal[static] = allocate(k90[static] / n, b_stat, lo=lo, hi=n)
        return nominal

    def _chunk_scores(self, a: np.ndarray, b: int) -> np.ndarray:
        """[n] scores whose top-b is: whole chunks by mass (tier 4), then the best single tokens (tier
        2), then the rest by attention (padding)."""
        n, c = a.size, self.chunk
        starts = np.arange(0, n, c)
        mass = np.add.reduceat(a, starts)
        sizes = np.diff(np.append(starts, n))
        s = a.copy()
        # Greedy by mass: take chunks while at least a whole chunk of room is left (every chunk but
        # the last has size c, so a chunk taken then always fits): a prefix of the sorted order.
        order = np.argsort(-mass, kind="stable")
        before = np.cumsum(sizes[order]) - sizes[order]             # room used before each chunk
        taken = order[before <= b - c]
        for ch in taken:
            s[starts[ch]:starts[ch] + sizes[ch]] = 4.0 + mass[ch]
        room = b - int(sizes[taken].sum())
        if room:
            free = np.flatnonzero(s < 4.0)
            best = free[np.argsort(-a[free], kind="stable")[:room]]
            s[best] = 2.0 + a[best]
        return s
