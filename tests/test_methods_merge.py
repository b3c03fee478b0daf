"""merged_kv: every slot is the weighted mean of its kept token and the tokens merged into it."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekv.methods import KVView, Span, get_method
from edgekv.methods.base import Plan
from edgekv.methods.merge import merged_kv


def reference(keys, plan):
    """Slot-by-slot float64 weighted means."""
    L, H, C = plan.keep.shape
    out = np.zeros((L, H, C, keys.shape[-1]))
    for l in range(L):
        for h in range(H):
            for s in range(C):
                members = np.flatnonzero(plan.merge_to[l, h] == s).tolist() + [plan.keep[l, h, s]]
                w = plan.merge_weight[l, h, members].astype(np.float64)
                x = keys[l, h, members].astype(np.float64)
                out[l, h, s] = x[-1] if w.sum() <= 0 else (w[:, None] * x).sum(0) / w.sum()
    return out


@st.composite
def plans(draw):
    L, H = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T, d = draw(st.integers(1, 40)), draw(st.integers(1, 6))
    C = draw(st.integers(1, T))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    keep = np.stack([np.stack([rng.permutation(T)[:C] for _ in range(H)]) for _ in range(L)])
    merge_to = rng.integers(-1, C, size=(L, H, T))
    np.put_along_axis(merge_to, keep, -1, axis=-1)
    weight = rng.random((L, H, T)).astype(np.float32) * (rng.random((L, H, T)) > 0.2)
    keys = rng.standard_normal((L, H, T, d)).astype(np.float32)
    values = rng.standard_normal((L, H, T, d)).astype(np.float32)
    return keys, values, Plan(keep=keep, nominal=np.full((L, H), C), merge_to=merge_to, merge_weight=weight)


@settings(max_examples=60, deadline=None)
@given(plans())
def test_merged_kv_is_the_weighted_mean(case):
    keys, values, plan = case
    k_slots, v_slots = merged_kv(keys, values, plan)
    assert k_slots.dtype == np.float32 and k_slots.shape == plan.keep.shape + (keys.shape[-1],)
    np.testing.assert_allclose(k_slots, reference(keys, plan), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v_slots, reference(values, plan), rtol=1e-4, atol=1e-5)


def test_merged_kv_without_merges_is_a_gather():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 2, 20, 4)).astype(np.float32)
    keep = np.stack([np.stack([rng.permutation(20)[:5] for _ in range(2)]) for _ in range(2)])
    k_slots, v_slots = merged_kv(keys, -keys, Plan(keep=keep, nominal=np.full((2, 2), 5)))
    np.testing.assert_array_equal(k_slots, np.take_along_axis(keys, keep[..., None], axis=2))
    np.testing.assert_array_equal(v_slots, -k_slots)


def test_flowmm_merges_preserve_the_weighted_sum():
    """sum over slots of (slot weight x slot K) == sum over kept and merged tokens of w_t k_t."""
    rng = np.random.default_rng(1)
    L, Hk, g, T, d, W = 2, 2, 2, 120, 8, 6
    keys = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    values = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    q = rng.standard_normal((L, Hk * g, W, d)).astype(np.float32)
    cand = np.zeros(T, bool)
    cand[:T - W] = True
    view = KVView(keys, values, cand, spans=(Span(0, T - W, "media", 0), Span(T - W, T, "text")), queries=q)
    for weights in ("importance", "mean", "pivot"):
        plan = get_method("flowmm", theta=0.0, merge_weights=weights).plan(view, 15)
        k_slots, v_slots = merged_kv(keys, values, plan)
        member = plan.merge_to >= 0
        np.put_along_axis(member, plan.keep, True, axis=-1)
        w = np.where(member, plan.merge_weight, 0.0)
        slot_w = np.zeros(plan.keep.shape)
        for l in range(L):
            for h in range(Hk):
                slot_w[l, h] = w[l, h, plan.keep[l, h]] + np.bincount(
                    plan.merge_to[l, h][plan.merge_to[l, h] >= 0],
                    weights=w[l, h][plan.merge_to[l, h] >= 0], minlength=plan.n_slots)
        for x, slots in ((keys, k_slots), (values, v_slots)):
            np.testing.assert_allclose((slot_w[..., None] * slots).sum(2), (w[..., None] * x).sum(2),
                                       rtol=1e-4, atol=1e-5)
