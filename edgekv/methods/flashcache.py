"""`flashcache`: FlashCache, frequency-domain outlier KV selection with dynamic layer budgets.

Paper: Yang et al., "Revisiting Multimodal KV Cache Compression: A Frequency-Domain-Guided
Outlier-KV-Aware Approach", CVPR 2026, https://arxiv.org/abs/2511.16786 (no code released).

Per layer l, with X_K, X_V the layer's keys / values over the n candidate tokens, heads flattened
into features ([n, H_kv * d]; the DCT acts on each feature column, so this equals a per-head DCT):
    C_K = DCT-II(X_K) along tokens, norm="ortho";  omega = floor(gamma * n), gamma = 0.15
    K_base = IDCT(C_K with rows m > omega zeroed)                  (low-pass "base KV"; same for V)
    Dev[x] = MSE(X_K[x], K_base[x]) + MSE(X_V[x], V_base[x])       (per token; keep the largest)
    R^l = sum_{m>omega} C_K[m]^2 / sum_m C_K[m]^2 + (same for V)   (high-frequency energy share)
    b_l proportional to R^l, floor 0.2 * budget, capped at n, overflow redistributed, sum = L * budget

Attention-free: needs no queries. Reconstructed choices (the paper's body was not available):
* the DCT runs over the candidate tokens only, in position order (the compressed span; protected text
  tokens would add text/media boundaries to the spectrum) (reconstructed);
* one selection per layer, shared by all its KV heads (the paper's per-layer budget and per-token
  MSE); `per_head=True` ranks each head by its own Dev (mean over d), budgets stay per layer
  (reconstructed);
* the budget floor 0.2 * budget and the water-filling redistribution (reconstructed);
* K is the cached post-RoPE key (the paper analyses "the multimodal KV cache").
Since the ortho DCT is orthogonal, the high-pass energy equals sum_x ||X[x] - X_base[x]||^2: R comes
from the same residual as Dev. Cells used = the largest layer budget; smaller layers pad with their
next-best tokens.

DCT backend: scipy.fft (pocketfft) by default; `backend="pyfftw"` uses pyfftw's scipy_fft interface
when importable. On the 2-core dev box pocketfft was faster than pyfftw's DCT: 6.7 ms against 16 ms
(FFTW_MEASURE) and 23 ms (FFTW_ESTIMATE) for [4, 128, 8192] float32 with 2 threads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.fft

from edgekv.methods.base import KVView, Plan, ScoreMethod, allocate, check_budget, plan_from_scores
from edgekv.methods.parallel import parallel_map, threads
from edgekv.methods.registry import register


def _fft_module(backend: str):
    if backend == "pyfftw":
        try:
            import pyfftw.interfaces.cache
            import pyfftw.interfaces.scipy_fft as fftw
        except ImportError:
            return scipy.fft
        pyfftw.interfaces.cache.enable()
        return fftw
    return scipy.fft


TILE = 64  # tokens per transposed copy: a [H, 64, d] tile stays in cache (2x faster than one transpose)


def high_pass_residual(x: np.ndarray, gamma: float, fft=scipy.fft, workers: int = 1,
                       out: np.ndarray | None = None) -> np.ndarray:
    """x [H, n, d] -> residual x - x_base as [H, d, n] float32 (tokens on the last axis), where
    x_base keeps the DCT-II coefficients 0..floor(gamma * n) of every (head, feature) column.

    The transforms run along the contiguous axis of a transposed copy (`out`, if given): pocketfft
    took 14 ms there against 21 ms along the strided token axis of [4, 8192, 128]. They are left
    unnormalised: zeroing coefficients commutes with the DCT's diagonal scaling, so the low-pass
    projection, and the residual, are the same as with norm="ortho"."""
    H, n, d = x.shape
    buf = np.empty((H, d, n), dtype=np.float32) if out is None else out
    for i in range(0, n, TILE):
        np.copyto(buf[:, :, i:i + TILE], x[:, i:i + TILE, :].transpose(0, 2, 1))
    c = fft.dct(buf, type=2, axis=2, overwrite_x=True, workers=workers)
    c[..., : int(np.floor(gamma * n)) + 1] = 0.0
    return fft.idct(c, type=2, axis=2, overwrite_x=True, workers=workers)


def spectral_outliers(view: KVView, gamma: float = 0.15, per_head: bool = False,
                      backend: str = "scipy") -> tuple[np.ndarray, np.ndarray]:
    """Dev [L, H_kv, T] (0 off the candidates; equal over heads unless per_head) and R [L]."""
    fft = _fft_module(backend)
    L, H, T, d = view.keys.shape
    n, span = view.n_candidates, view.candidate_index  # a slice for one contiguous media run
    dev = np.zeros((L, H, T), dtype=np.float32)
    ratio = np.zeros(L)
    if n == 0:
        return dev, ratio
    # Whole layers go to the planning threads, each transform single-threaded (pocketfft's own
    # workers only when there are fewer layers than threads).
    workers = max(1, threads() // L)

    def one_layer(layer: int, scratch: np.ndarray) -> None:
        for cache in (view.keys, view.values):
            x = cache[layer][:, span, :]
            total = np.einsum("hnd,hnd->h", x, x).sum(dtype=np.float64)             # = sum C^2
            res = high_pass_residual(x, gamma, fft, workers, out=scratch)            # [H, d, n]
            sq = np.einsum("hdn,hdn->hn", res, res)                                  # [H, n]
            dev[layer][:, span] += sq / d if per_head else sq.sum(axis=0) / (H * d)
            ratio[layer] += sq.sum(dtype=np.float64) / total if total > 0 else 0.0  # Parseval

    parallel_map(one_layer, range(L), scratch=(H, d, n))
    return dev, ratio


@register("flashcache")
@dataclass
class FlashCache(ScoreMethod):
    gamma: float = 0.15        # low-pass cutoff omega = gamma * n (paper optimum 0.1-0.2)
    floor: float = 0.2         # minimum layer budget, as a fraction of the budget (reconstructed)
    per_head: bool = False     # rank tokens per KV head instead of per layer (reconstructed default)
    backend: Literal["scipy", "pyfftw"] = "scipy"

    name = "flashcache"
    paper = "https://arxiv.org/abs/2511.16786"
    needs_queries = False
    # view_cells stays "all": the DCT runs over the candidates only, but einsum's sums over a gathered
    # copy and over a contiguous view round differently (tests/test_methods_scope.py saw it)

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError("gamma must be in (0, 1)")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError("floor must be in [0, 1]")
        if self.backend not in ("scipy", "pyfftw"):
            raise ValueError("backend must be 'scipy' or 'pyfftw'")

    def score(self, view: KVView) -> np.ndarray:
        return spectral_outliers(view, self.gamma, self.per_head, self.backend)[0]

    def plan(self, view: KVView, budget: int) -> Plan:
        budget = check_budget(budget, view.n_candidates)
        dev, ratio = spectral_outliers(view, self.gamma, self.per_head, self.backend)
        L, n = view.n_layers, view.n_candidates
        layer_budget = allocate(ratio, L * budget, lo=int(self.floor * budget), hi=n)
        nominal = np.repeat(layer_budget[:, None], view.n_kv_heads, axis=1)
        return plan_from_scores(self.name, view, dev, nominal, high_freq_ratio=ratio.tolist())
