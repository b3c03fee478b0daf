"""Every registered method on random caches of several shapes: valid plans, exact global budgets,
determinism. A new method is tested here for free. Plus the shared budget allocator."""
from __future__ import annotations

import numpy as np
import pytest

from edgekv.methods import METHODS, KVView, Span, get_method
from edgekv.methods.base import allocate, top_k
from edgekv.methods.merge import merged_kv


def make_view(L, Hk, H, T, d, W, spans, zero_tokens=(), seed=0) -> KVView:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    values = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    keys[:, :, list(zero_tokens)] = 0.0
    values[:, :, list(zero_tokens)[:1]] = 0.0
    queries = rng.standard_normal((L, H, W, d)).astype(np.float32) * 2.0
    candidates = np.zeros(T, dtype=bool)
    for s in spans:
        candidates[s.start:s.stop] = s.kind == "media"
    return KVView(keys, values, candidates, spans=spans, queries=queries, seed=seed)


# name -> (L, H_kv, H, T, d, W, spans, zero tokens)
SHAPES = {
    "gqa-two-images": (3, 2, 8, 70, 16, 8, (Span(0, 4, "text"), Span(4, 34, "media", 0),
                                           Span(34, 62, "media", 1), Span(62, 70, "text")), (10, 11)),
    "one-head": (2, 1, 1, 40, 8, 4, (Span(0, 2, "text"), Span(2, 36, "media", 0), Span(36, 40, "text")), (5,)),
    "one-candidate": (2, 2, 4, 12, 8, 4, (Span(0, 5, "text"), Span(5, 6, "media", 0), Span(6, 12, "text")), ()),
    "text-between-media": (2, 4, 4, 90, 8, 6, (Span(0, 1, "text"), Span(1, 40, "media", 0), Span(40, 44, "text"),
                                               Span(44, 84, "media", 1), Span(84, 90, "text")), (1, 2, 3)),
}


def budgets_for(n: int) -> list[int]:
    return sorted({1, max(1, n // 7), max(1, n // 2), n})


def plan_arrays(plan):
    return [plan.keep, plan.nominal] + ([] if plan.merge_to is None else [plan.merge_to, plan.merge_weight])


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_lands_on_its_budget(name, shape):
    L, Hk, H, T, d, W, spans, zeros = SHAPES[shape]
    n = make_view(L, Hk, H, T, d, W, spans).n_candidates
    for budget in budgets_for(n):
        view = make_view(L, Hk, H, T, d, W, spans, zeros)
        plan = get_method(name).plan(view, budget)
        plan.validate(view)
        keep, nominal = plan.keep, plan.nominal
        assert keep.dtype == np.int64 and nominal.shape == (L, Hk)
        assert view.candidates[keep].all()
        for row in keep.reshape(-1, keep.shape[-1]):
            assert len(set(row.tolist())) == row.size
        expected = n if name == "full" else budget
        assert nominal.sum() == L * Hk * expected, "the global budget must be exact"
        assert keep.shape[-1] == nominal.max()
        assert (nominal >= 0).all() and (nominal <= n).all()
        if plan.merge_to is not None:
            merged = plan.merge_to >= 0
            assert not merged[..., ~view.candidates].any()
            kept = np.zeros_like(merged)
            np.put_along_axis(kept, keep, True, axis=-1)
            assert not (merged & kept).any(), "a kept token is its own slot, never merged elsewhere"
            assert (plan.merge_weight >= 0).all()
            k_slots, v_slots = merged_kv(view.keys, view.values, plan)
            assert k_slots.shape == (L, Hk, keep.shape[-1], d) and np.isfinite(k_slots).all()
        again = get_method(name).plan(make_view(L, Hk, H, T, d, W, spans, zeros), budget)
        for a, b in zip(plan_arrays(plan), plan_arrays(again), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_declare_what_they_need(name):
    L, Hk, H, T, d, W, spans, _ = SHAPES["gqa-two-images"]
    view = make_view(L, Hk, H, T, d, W, spans)
    method = get_method(name)
    no_q = KVView(view.keys, view.values, view.candidates, spans=spans)
    if method.needs_queries:
        with pytest.raises(ValueError):
            method.plan(no_q, 5)
    else:
        method.plan(no_q, 5).validate(no_q)


def test_random_depends_on_both_seeds():
    L, Hk, H, T, d, W, spans, _ = SHAPES["gqa-two-images"]
    keep = lambda view_seed, seed: get_method("random", seed=seed).plan(  # noqa: E731
        make_view(L, Hk, H, T, d, W, spans, seed=view_seed), 10).keep
    np.testing.assert_array_equal(keep(0, 0), keep(0, 0))
    assert not np.array_equal(keep(0, 0), keep(0, 1))
    assert not np.array_equal(keep(0, 0), keep(1, 0))


# --- the shared allocator ------------------------------------------------------------------------

def test_allocate_is_proportional_and_exact():
    np.testing.assert_array_equal(allocate([1, 1, 2], 40), [10, 10, 20])
    np.testing.assert_array_equal(allocate([1, 2, 3, 4], 10), [1, 2, 3, 4])
    out = allocate([1, 1, 1], 10)
    assert out.sum() == 10 and out.max() - out.min() == 1
    np.testing.assert_array_equal(allocate([0, 0, 0], 7), [3, 2, 2])  # zero weights = uniform, earlier first


def test_allocate_floor_and_cap_redistribute():
    out = allocate([0.0, 1.0, 100.0], 30, lo=3, hi=20)
    assert out.sum() == 30 and out.min() >= 3 and out.max() <= 20
    np.testing.assert_array_equal(out, [3, 7, 20])  # capped at 20, the rest in proportion above the floor
    out = allocate([1.0, 0.0], 15, lo=0, hi=10)      # the positive entry is full: the zero one takes the rest
    np.testing.assert_array_equal(out, [10, 5])
    with pytest.raises(ValueError):
        allocate([1, 1], 30, hi=10)


def test_allocate_random_inputs_hit_the_total():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        hi = int(rng.integers(1, 50))
        lo = int(rng.integers(0, hi + 1))
        total = int(rng.integers(n * lo, n * hi + 1))
        w = rng.random(n) * (rng.random(n) > 0.3)
        out = allocate(w, total, lo=lo, hi=hi)
        assert out.sum() == total and out.min() >= lo and out.max() <= hi


def test_top_k_equals_a_full_stable_sort():
    """top_k's partition shortcut returns exactly what a stable argsort would, ties and NaN included."""
    rng = np.random.default_rng(4)
    big = np.finfo(np.float64).max / 2
    for _ in range(200):
        T, rows = int(rng.integers(1, 200)), int(rng.integers(1, 4))
        s = rng.integers(0, 6, size=(rows, 2, T)).astype(float)        # heavy ties
        s[rng.random(s.shape) < 0.05] = np.nan
        s[rng.random(s.shape) < 0.02] = np.inf
        cand = rng.random(T) < 0.8
        k = int(rng.integers(1, T + 1))
        ref = np.argsort(-np.where(cand, np.nan_to_num(s, nan=-big, posinf=big, neginf=-big), -np.inf),
                         axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(top_k(s, cand, k), ref)


def test_window_attention_matches_a_plain_softmax():
    """The blocked, fused window attention equals softmax(q K^T * scale), causal, GQA-averaged."""
    L, Hk, H, T, d, W, spans, _ = SHAPES["gqa-two-images"]
    view = make_view(L, Hk, H, T, d, W, spans)
    g = H // Hk
    ref = np.zeros((L, Hk, W, T))
    for layer in range(L):
        for head in range(H):
            logits = view.queries[layer, head].astype(np.float64) @ view.keys[layer, head // g].T.astype(np.float64)
            logits *= view.scale
            for j in range(W):
                logits[j, T - W + j + 1:] = -np.inf
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            ref[layer, head // g] += p / p.sum(axis=-1, keepdims=True) / g
    np.testing.assert_allclose(view.window_attention, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule,uniform", [("pyramidkv", "snapkv"), ("adakv", "snapkv"),
                                              ("mixkv-pyramidkv", "mixkv"), ("mixkv-adakv", "mixkv")])
def test_a_schedule_at_equal_cells_is_its_uniform_method(schedule, uniform):
    """Issue 21's allocator route: with per-slot packing a cell holds one token for every (layer, KV head),
    so the cells a plan costs are its largest row, and a row under it fills its spare slots with its
    next-best tokens (docs/architecture.md). Held to the same cells (Plan.capped, as a context sized for the
    budget does) a layer or head schedule keeps, in every row, the same tokens as its uniform method; left
    uncapped it keeps what its uniform method keeps at the schedule's own cell count. A schedule only
    changes how many cells are spent, which the memory axis prices (docs/memory.md)."""
    L, Hk, H, T, d, W = 6, 2, 4, 200, 16, 8
    spans = (Span(0, 4, "text"), Span(4, 190, "media", 0), Span(190, 200, "text"))
    for cells in (20, 50, 93):
        sched = get_method(schedule).plan(make_view(L, Hk, H, T, d, W, spans, seed=1), cells)
        flat = get_method(uniform).plan(make_view(L, Hk, H, T, d, W, spans, seed=1), cells)
        assert sched.n_slots > cells and flat.n_slots == cells    # the schedule alone spends more cells
        capped = sched.capped(cells)
        assert capped.n_slots == cells
        assert np.array_equal(np.sort(capped.keep, axis=-1), np.sort(flat.keep, axis=-1))
        wide = get_method(uniform).plan(make_view(L, Hk, H, T, d, W, spans, seed=1), sched.n_slots)
        assert np.array_equal(np.sort(sched.keep, axis=-1), np.sort(wide.keep, axis=-1))
