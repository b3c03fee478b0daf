"""The method contract: a read-only view of the cache in, a plan of what to keep (and merge) out.

Methods are pure numpy: nothing here imports llama.cpp. The runtime builds a `KVView` (`view.py`) from the
parsed state blob, calls `method.plan(view, budget)`, and the packer (`edgekv.kv.packer`) writes the plan back
with per-slot packing (docs/architecture.md, "Per-slot packing"): every (layer, KV head) slot row may hold a different token.
Here: the `Method` / `ScoreMethod` contract and the helpers methods share (top-k, pooling, norms, budget
allocation and parsing). Shapes as in `view.py`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np

from edgekv.errors import BudgetError
from edgekv.plan import Plan  # noqa: F401  (re-exported: methods build plans)
from edgekv.methods.parallel import parallel_map
from edgekv.methods.view import KVView, Modality, Span  # noqa: F401  (re-exported: methods read views)


class Method(ABC):
    """A compression method. Subclasses are dataclasses whose fields are the hyper-parameters."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""           # link to the paper (or code) the method follows
    needs_queries: ClassVar[bool] = False  # True when plan() requires view.queries
    # What plan() reads, so the runtime converts only that to float32 (a compaction's largest copy).
    # view_cells "candidates": the plan depends on the candidate tokens alone (their K/V, order, seed),
    # not on protected tokens, T, spans or queries, so the runtime may pass a view of the candidates only
    # and map the plan back. reads_keys / reads_values False: that array is a zero-byte placeholder.
    # tests/test_methods_scope.py checks every registered method against the whole view.
    view_cells: ClassVar[Literal["all", "candidates"]] = "all"
    reads_keys: ClassVar[bool] = True
    reads_values: ClassVar[bool] = True
    # plans_on_chunk: the method can plan one media chunk from a view of that chunk alone (with a window
    # that lies outside it: KVView.window_outside), so streamed compaction never copies the whole cache
    # to the host (the LastChunk region, runtime/compactor.py). Methods that read the window's own tokens or positions
    # (snapkv, expected, flowmm) keep the whole-cache path.
    plans_on_chunk: ClassVar[bool] = False

    @abstractmethod
    def plan(self, view: KVView, budget: int) -> Plan:
        """Keep `budget` candidate cells per (layer, KV head) on average (1 <= budget <= candidates)."""


class ScoreMethod(Method):
    """kvpress-style: a method only says `score` (higher = keep); top-k and bookkeeping live here.

    `budgets` may be overridden for variable per-(layer, head) allocations (PyramidKV, AdaKV, ...):
    the cell count becomes the largest budget and smaller heads are padded with their next-best tokens.
    """

    @abstractmethod
    def score(self, view: KVView) -> np.ndarray:
        """[L, H_kv, T] importance of every token for every (layer, KV head); only candidates count."""

    def budgets(self, view: KVView, budget: int, scores: np.ndarray) -> np.ndarray:
        """[L, H_kv] per-slot budgets; uniform by default."""
        return np.full((view.n_layers, view.n_kv_heads), budget, dtype=np.int64)

    def plan(self, view: KVView, budget: int) -> Plan:
        budget = check_budget(budget, view.n_candidates)
        scores = np.asarray(self.score(view), dtype=np.float64)
        if scores.shape != (view.n_layers, view.n_kv_heads, view.n_tokens):
            raise ValueError(f"{self.name}.score returned {scores.shape}")
        nominal = np.asarray(self.budgets(view, budget, scores), dtype=np.int64)
        return plan_from_scores(self.name, view, scores, nominal)


def plan_from_scores(name: str, view: KVView, scores: np.ndarray, nominal: np.ndarray, **info) -> Plan:
    """The plan keeping each row's top max(nominal) candidates (smaller budgets pad with next-best)."""
    keep = top_k(scores, view.candidates, int(nominal.max()))
    return Plan(keep=keep, nominal=nominal, info={"method": name, **info}).validate(view)


def check_budget(budget: int, n_candidates: int) -> int:
    """A per-head cell budget must be 1..n_candidates (the runtime resolves ratios before this)."""
    if int(budget) != budget or not 1 <= budget <= n_candidates:
        raise BudgetError(f"budget must be an integer in 1..{n_candidates} cells, got {budget}")
    return int(budget)


def top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """[L, H, k] indices of the k best candidates per row, best first; ties go to the earlier token.

    NaN scores count as the worst candidates. Deterministic: the result of a stable sort on the
    negated scores, computed as a partition (O(T)) and a stable sort of the k best only.
    """
    big = np.finfo(np.float64).max / 2  # finite for every candidate, so non-candidates sort last
    scores = np.asarray(scores, dtype=np.float64)  # float32 input would overflow on `big`
    neg = -np.where(candidates, np.nan_to_num(scores, nan=-big, posinf=big, neginf=-big), -np.inf)
    T, k = neg.shape[-1], max(k, 0)
    rows = neg.reshape(-1, T)
    out = np.empty((rows.shape[0], k), dtype=np.int64)

    # One row at a time on this thread: on the planning threads these small sorts ran slower (GIL).
    for i, row in enumerate(rows if k else ()):
        if 2 * k >= T:  # a full sort; below half the row, partition first and sort the k best only
            out[i] = np.argsort(row, kind="stable")[:k]
        else:           # the k best and any ties with the k-th, then a stable sort
            idx = np.flatnonzero(row <= np.partition(row, k - 1)[k - 1])
            out[i] = idx[np.argsort(row[idx], kind="stable")[:k]]
    return out.reshape(neg.shape[:-1] + (k,))


def pool1d(x: np.ndarray, kernel: int, mode: Literal["avg", "max"] = "avg") -> np.ndarray:
    """1-D pooling along the last axis with stride 1 and 'same' zero padding (torch avg_pool1d,
    count_include_pad=True, as SnapKV uses it)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, kernel - 1 - pad)],
                constant_values=0.0 if mode == "avg" else -np.inf)
    n = x.shape[-1]
    out = xp[..., :n].copy()
    for i in range(1, kernel):  # shifted adds: the same bits as a windowed mean for kernels < 8
        if mode == "avg":
            out += xp[..., i:i + n]
        else:
            np.maximum(out, xp[..., i:i + n], out=out)
    return out / kernel if mode == "avg" else out


def row_norms(x: np.ndarray) -> np.ndarray:
    """[..., T, d] -> [..., T] float32 L2 norms of the last axis, without a squared temporary."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty(x.shape[:-1], dtype=np.float32)
    flat_x, flat_out = x.reshape(-1, *x.shape[-2:]), out.reshape(-1, x.shape[-2])

    def one(i: int, _: None) -> None:  # one (layer, head) at a time keeps temporaries small
        np.einsum("td,td->t", flat_x[i], flat_x[i], out=flat_out[i])
        np.sqrt(flat_out[i], out=flat_out[i])

    parallel_map(one, range(flat_x.shape[0]))
    return out


def allocate(weights: np.ndarray, total: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Integer budgets proportional to `weights`, each in [lo, hi], summing exactly to `total`.

    Water-filling: x_i = clip(c * w_i, lo, hi) with the scale c solved so that sum(x) == total, so a
    floor or cap on one entry redistributes its overflow to the others in proportion to their weights;
    then largest-remainder rounding (ties to the earlier entry). All-zero weights mean uniform.
    Used by the per-layer / per-head allocators (PyramidKV, AdaKV, FlashCache, HybridKV).
    """
    w = np.maximum(np.asarray(weights, dtype=np.float64).ravel(), 0.0)
    w = np.nan_to_num(w, nan=0.0, posinf=0.0)
    n = w.size
    hi = int(total) if hi is None else int(hi)
    lo = int(lo)
    if not n * lo <= total <= n * hi:
        raise ValueError(f"cannot split {total} over {n} entries within [{lo}, {hi}]")
    if not w.any():
        w = np.ones(n)
    pos = w > 0
    # f(c) = sum clip(c*w, lo, hi) is piecewise linear and nondecreasing, with kinks at lo/w and hi/w:
    # evaluate it at every kink (O(n log n) with sorted kinks and cumulative weights), then solve the
    # linear piece that crosses `total`.
    wp = w[pos]
    up, full = np.sort(lo / wp), np.sort(hi / wp)      # entry leaves lo at c > lo/w, reaches hi at hi/w
    w_up = np.concatenate([[0.0], np.cumsum(wp[np.argsort(lo / wp, kind="stable")])])
    w_full = np.concatenate([[0.0], np.cumsum(wp[np.argsort(hi / wp, kind="stable")])])
    kinks = np.unique(np.concatenate([[0.0], up, full]))
    n_up = np.searchsorted(up, kinks, side="left")      # entries above lo (lo/w < c)
    n_full = np.searchsorted(full, kinks, side="right")  # entries at hi (hi/w <= c)
    f = lo * (n - n_up) + kinks * (w_up[n_up] - w_full[n_full]) + hi * n_full
    j = int(np.searchsorted(f, total))
    if j == 0:
        c = 0.0
    elif j == kinks.size:     # the positive weights are all at hi; see `short` below
        c = kinks[-1]
    else:
        c = kinks[j - 1] + (total - f[j - 1]) * (kinks[j] - kinks[j - 1]) / (f[j] - f[j - 1])
    x = np.clip(c * w, lo, hi)
    short = total - x.sum()
    if short > 1e-9 and (~pos).any():  # zero-weight entries absorb what the positive ones cannot
        x[~pos] = np.minimum(hi, lo + short / (~pos).sum())
    out = np.floor(x + 1e-9).astype(np.int64)
    rem = int(total - out.sum())
    if rem > 0:
        frac = np.where(out < hi, x - out, -np.inf)
        out[np.argsort(-frac, kind="stable")[:rem]] += 1
    elif rem < 0:  # only from float slack: take back from the smallest remainders above lo
        frac = np.where(out > lo, x - out, np.inf)
        out[np.argsort(frac, kind="stable")[:-rem]] -= 1
    return out


def resolve_budget(budget: float | int | str, n_candidates: int) -> int:
    """A user budget -> cells per head. A ratio 0 < r <= 1 ('0.25') or an absolute count ('512').

    Integers >= 2 are cell counts; '1' and '1.0' mean the whole span. An absolute budget above the
    number of compressible tokens keeps them all.
    """
    b = parse_budget(budget)
    if n_candidates <= 0:
        return 0
    if isinstance(b, float):
        return max(1, min(n_candidates, int(round(b * n_candidates))))
    return min(b, n_candidates)


def parse_budget(budget: float | int | str) -> float | int:
    """'0.25' -> 0.25 (ratio), '512' -> 512 (cells), '1' -> 1.0. Anything else is a BudgetError."""
    text = str(budget).strip()
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(f"budget must be a ratio in (0, 1] or a number of cells, got {budget!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise BudgetError(f"budget must be > 0 (a ratio in (0, 1] or a number of cells), got {budget!r}")
    if value <= 1.0:
        return float(value)
    if value != int(value):
        raise BudgetError(f"budget {budget!r} is above 1 but not a whole number of cells; "
                          "use a ratio in (0, 1] or an integer cell count")
    return int(value)
