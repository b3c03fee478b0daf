"""Known answers: planted structure that each method must find."""
from __future__ import annotations

import numpy as np
import pytest

from edgekv.methods import KVView, Span, get_method
from edgekv.methods.adakv import adakv_budgets
from edgekv.methods.flowmm import modality_groups
from edgekv.methods.hybridkv import coverage_k
from edgekv.methods.keydiff import key_diversity
from edgekv.methods.pyramidkv import pyramid_budgets


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def kept(plan, layer, head):
    """The set of tokens of one row within its own nominal budget."""
    return set(plan.keep[layer, head, : plan.nominal[layer, head]].tolist())


def aligned_queries(keys, targets, group, window, strength=40.0):
    """[L, H, W, d] queries: every query head of KV head h points at its layer's target key."""
    L, Hk, _, d = keys.shape
    q = np.zeros((L, Hk * group, window, d), np.float32)
    for layer in range(L):
        for h in range(Hk):
            q[layer, h * group:(h + 1) * group] = strength * np.sqrt(d) * unit(keys[layer, h, targets[layer][h]])
    return q


def media_view(keys, values, queries=None, text_tail=0, spans=None):
    T = keys.shape[2]
    cand = np.zeros(T, bool)
    cand[: T - text_tail] = True
    spans = spans or ((Span(0, T - text_tail, "media", 0),) + ((Span(T - text_tail, T, "text"),) if text_tail else ()))
    for s in spans:
        cand[s.start:s.stop] = s.kind == "media"
    return KVView(keys.astype(np.float32), values.astype(np.float32), cand, spans=spans, queries=queries)


# --- query-agnostic scores ---------------------------------------------------------------------------

def test_streaming_keeps_exactly_sinks_and_recent():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 2, 100, 8))
    view = media_view(keys, keys, spans=(Span(0, 5, "text"), Span(5, 95, "media", 0), Span(95, 100, "text")))
    plan = get_method("streaming").plan(view, 10)
    for layer in range(2):
        for head in range(2):
            assert kept(plan, layer, head) == {5, 6, 7, 8} | set(range(89, 95))


def test_norm_and_keydiff_scores_find_their_token():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1, 2, 50, 16)) + 3.0       # a shared direction: keydiff's anchor
    values = rng.standard_normal((1, 2, 50, 16))
    keys[0, :, 7] *= 0.05                                    # smallest key
    values[0, :, 21] *= 10.0                                 # largest value
    keys[0, :, 33] = -keys[0, :, 33]                         # points against the mean direction
    view = media_view(keys, values)
    assert all(kept(get_method("knorm").plan(view, 1), 0, h) == {7} for h in range(2))
    assert all(kept(get_method("vnorm").plan(view, 1), 0, h) == {21} for h in range(2))
    assert all(kept(get_method("keydiff").plan(view, 1), 0, h) == {33} for h in range(2))


# --- SnapKV family ----------------------------------------------------------------------------------

def test_snapkv_keeps_what_each_window_head_attends_to():
    rng = np.random.default_rng(2)
    L, Hk, g, T, d, W = 2, 2, 3, 80, 32, 4
    keys = rng.standard_normal((L, Hk, T, d))
    targets = [[10, 50], [30, 70]]
    view = media_view(keys, keys, aligned_queries(keys, targets, g, W), text_tail=W)
    plan = get_method("snapkv", kernel_size=1).plan(view, 1)
    for layer in range(L):
        for head in range(Hk):
            assert kept(plan, layer, head) == {targets[layer][head]}
    # with SnapKV's avgpool(5) the target's whole pooling window ties; a budget of 5 keeps exactly it
    plan = get_method("snapkv").plan(view, 5)
    for layer in range(L):
        for head in range(Hk):
            t = targets[layer][head]
            assert kept(plan, layer, head) == set(range(t - 2, t + 3))


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "adakv", "mixkv", "mixkv-adakv", "mixkv-pyramidkv"])
def test_window_attention_does_not_leak_into_the_border_tokens(method):
    """The window attends mostly to itself; avgpool(5) over the whole row used to pour that mass into the
    2 tokens just before the window, which then beat a token the window really looks at (kvpress and the
    MixKV code pool the prefix only)."""
    T, W, d = 24, 4, 4
    keys = np.zeros((1, 1, T, d))
    keys[0, 0, T - W:, 0] = 9.0          # the window's own keys: most of its attention
    keys[0, 0, 5, 0] = 3.0               # the token the window looks at, far from the border
    keys[0, 0, T - W - 1, 0] = 2.5       # the border token: less attention than token 5
    keys[0, 0, :, 1] = np.arange(T) * 1e-3  # distinct keys (mixkv's diversity term needs some spread)
    q = np.zeros((1, 1, W, d), np.float32)
    q[..., 0] = 1.0 * np.sqrt(d)
    spans = (Span(0, 1, "text"), Span(1, T - W, "media", 0), Span(T - W, T, "text"))
    view = media_view(keys, keys, q, spans=spans)
    (pick,) = kept(get_method(method).plan(view, 1), 0, 0)
    assert abs(pick - 5) <= 2     # token 5 or a neighbour sharing its pooling window, not the border 19


def test_pyramid_schedule_decreases_and_keeps_the_mean():
    b = pyramid_budgets(8, 2, 100, 1000)
    layer = b[:, 0]
    assert (np.diff(layer) <= 0).all() and layer[0] == 195 and layer[-1] == 5   # max = 2b - b//20, min = b//20
    assert b.sum() == 8 * 2 * 100
    clipped = pyramid_budgets(8, 1, 90, 100)[:, 0]   # 2b - b//20 > n: max = n, min = 2b - n (AdaKV code)
    assert clipped[0] == 100 and clipped[-1] == 80 and clipped.sum() == 8 * 90


def test_adakv_allocation_follows_the_formula():
    # head 0 peaked (2 tokens hold 0.9), head 1 uniform; n = 64 candidates, budget 8, floor 0.2.
    n, b = 64, 8
    peaked = np.full(n, 0.1 / 62)
    peaked[[3, 40]] = 0.45
    spread = np.full(n, 1.0 / n)
    scores = np.stack([peaked, spread])[None]
    cand = np.ones(n, bool)
    # normalize: head 0 x (top-8 mass 0.9097), head 1 x 8/64; global top-16 = head 0's two peaks, then
    # head 1 (1/64 * 1/8 = 0.00195 > 0.00161 * 0.91): c = [2, 14] -> 0.8 c + 1.6 = [3.2, 12.8] -> [3, 13]
    np.testing.assert_array_equal(adakv_budgets(scores, cand, b), [[3, 13]])
    # without normalisation, the same counts here
    np.testing.assert_array_equal(adakv_budgets(scores, cand, b, normalize=False), [[3, 13]])
    # normalisation matters: head 0 has 0.8 in 4 peaks and a 0.2 tail, head 1 spreads 0.3 evenly
    strong = np.full(n, 0.2 / 60)
    strong[[1, 2, 3, 4]] = 0.2
    weak = np.full(n, 0.3 / n)
    s2 = np.stack([strong, weak])[None]
    # raw: 4 peaks, then weak 0.0047 > strong tail 0.0033: c = [4, 12] -> [4.8, 11.2] -> [5, 11]
    np.testing.assert_array_equal(adakv_budgets(s2, cand, b, normalize=False), [[5, 11]])
    # normalised: strong x 0.813 (tail 0.0027) beats weak x 1/8 (0.0006): c = [16, 0] -> [14, 2]
    np.testing.assert_array_equal(adakv_budgets(s2, cand, b), [[14, 2]])


def test_adakv_end_to_end_gives_the_broad_head_more_cells():
    rng = np.random.default_rng(3)
    L, Hk, g, T, d, W = 1, 2, 2, 68, 16, 4
    keys = rng.standard_normal((L, Hk, T, d))
    q = aligned_queries(keys, [[20, 20]], g, W, strength=20.0)
    q[:, g:] = 0.0                                           # KV head 1: uniform attention
    view = media_view(keys, keys, q, text_tail=W)
    plan = get_method("adakv").plan(view, 8)
    assert plan.nominal[0, 1] > plan.nominal[0, 0] and plan.nominal.sum() == 16
    assert kept(plan, 0, 0) >= {18, 19, 20, 21, 22}


# --- MixKV ------------------------------------------------------------------------------------------

def test_mixkv_redundant_keys_switch_the_pick_to_diversity():
    rng = np.random.default_rng(4)
    L, Hk, g, T, d, W = 1, 1, 2, 68, 16, 4
    n = T - W
    values = rng.standard_normal((L, Hk, T, d))
    diverse = rng.standard_normal((L, Hk, T, d))
    target, odd = 30, 50
    # diverse keys: r ~ 0, the score is importance: the attended token's pooling window wins
    view = media_view(diverse, values, aligned_queries(diverse, [[target]], g, W), text_tail=W)
    r_div = key_diversity(view)[1][0, 0]
    pick = kept(get_method("mixkv").plan(view, 1), 0, 0)
    assert r_div < 0.1 and pick <= set(range(target - 2, target + 3))
    # duplicated keys (every candidate = the attended key, but one): r ~ 1, diversity decides
    dup = np.repeat(diverse[:, :, target:target + 1], T, axis=2)
    dup[:, :, odd] = diverse[:, :, odd]
    dup[:, :, n:] = diverse[:, :, n:]
    view = media_view(dup, values, aligned_queries(dup, [[target]], g, W), text_tail=W)
    r_dup = key_diversity(view)[1][0, 0]
    assert r_dup > 0.9 and abs(r_dup - ((n - 1) * (n - 2) + 2 * (n - 1) * np.dot(
        unit(dup[0, 0, target]), unit(dup[0, 0, odd]))) / (n * (n - 1))) < 1e-4
    assert kept(get_method("mixkv").plan(view, 1), 0, 0) == {odd}
    assert kept(get_method("snapkv").plan(view, 1), 0, 0) != {odd}   # attention alone would not keep it


def test_mixkv_adakv_budgets_come_from_attention_only():
    rng = np.random.default_rng(5)
    L, Hk, g, T, d, W = 2, 2, 2, 60, 16, 4
    keys = rng.standard_normal((L, Hk, T, d))
    q = rng.standard_normal((L, Hk * g, W, d)) * 3
    view = media_view(keys, rng.standard_normal((L, Hk, T, d)), q.astype(np.float32), text_tail=W)
    np.testing.assert_array_equal(get_method("mixkv-adakv").plan(view, 9).nominal,
                                  get_method("adakv").plan(view, 9).nominal)
    np.testing.assert_array_equal(get_method("mixkv-pyramidkv").plan(view, 9).nominal,
                                  get_method("pyramidkv").plan(view, 9).nominal)


# --- FlashCache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_head", [False, True])
def test_flashcache_keeps_the_outlier_and_funds_its_layer(per_head):
    L, Hk, T, d = 2, 2, 256, 8
    t = np.arange(T)
    freqs = np.arange(1, d + 1) % 5 + 1                     # DCT basis frequencies 1..5, well under 0.15 T
    smooth = np.cos(np.pi * (t[:, None] + 0.5) * freqs[None, :] / T)   # exactly low-pass
    keys = np.broadcast_to(smooth, (L, Hk, T, d)).copy()
    values = keys.copy()
    keys[0, :, 100] += 3.0
    values[0, :, 100] -= 3.0
    view = media_view(keys, values)
    plan = get_method("flashcache", per_head=per_head).plan(view, 10)
    ratio = plan.info["high_freq_ratio"]
    assert ratio[1] < 1e-10 < ratio[0]
    assert plan.nominal[0, 0] > plan.nominal[1, 0] == 2       # the smooth layer sits on the 0.2 floor
    assert plan.nominal.sum() == L * Hk * 10
    for head in range(Hk):
        assert plan.keep[0, head, 0] == 100                   # the outlier ranks first


def test_flashcache_backends_agree():
    pytest.importorskip("pyfftw")
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((2, 2, 64, 8))
    view = media_view(keys, rng.standard_normal((2, 2, 64, 8)))
    a = get_method("flashcache").score(view)
    b = get_method("flashcache", backend="pyfftw").score(view)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- FlowMM -----------------------------------------------------------------------------------------

def flowmm_view(seed=7):
    rng = np.random.default_rng(seed)
    L, Hk, g, T, d, W = 2, 2, 2, 100, 16, 6
    spans = (Span(0, 2, "text"), Span(2, 40, "media", 0), Span(40, 48, "text"), Span(48, 94, "media", 1),
             Span(94, 100, "text"))
    keys = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    values = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    q = (rng.standard_normal((L, Hk * g, W, d)) * 2).astype(np.float32)
    cand = np.zeros(T, bool)
    for s in spans:
        cand[s.start:s.stop] = True
    cand[:2] = cand[94:] = False      # the text in the middle is a candidate too
    return KVView(keys, values, cand, spans=spans, queries=q)


def test_flowmm_intra_modal_never_crosses_media_items():
    view = flowmm_view()
    groups = modality_groups(view)
    for theta, strategy in ((1.0, "intra"), (0.0, "cross")):   # rho < 1 always, rho >= 0 always
        plan = get_method("flowmm", theta=theta).plan(view, 12)
        assert plan.info["strategy"] == [strategy] * view.n_layers
        merged = plan.merge_to >= 0
        target = np.take_along_axis(plan.keep, np.maximum(plan.merge_to, 0), axis=-1)
        across = merged & (groups[target] != groups[None, None, :])
        assert merged.sum() > 100
        assert across.any() == (strategy == "cross")


def test_flowmm_protects_top_pivots_and_follows_cosine():
    view = flowmm_view(8)
    plan = get_method("flowmm", theta=0.0).plan(view, 10)
    imp = view.window_attention.sum(axis=2)
    for layer in range(2):
        for head in range(2):
            piv = plan.keep[layer, head]
            tau = np.quantile(imp[layer, head, piv], 0.9)
            open_slots = np.flatnonzero(imp[layer, head, piv] <= tau)
            targets = plan.merge_to[layer, head][plan.merge_to[layer, head] >= 0]
            assert set(targets.tolist()) <= set(open_slots.tolist())
            k = unit(view.keys[layer, head])
            for t in np.flatnonzero(plan.merge_to[layer, head] >= 0):
                sims = k[piv[open_slots]] @ k[t]
                assert piv[plan.merge_to[layer, head, t]] == piv[open_slots[np.argmax(sims)]]


@pytest.mark.parametrize("weights", ["importance", "mean", "pivot"])
def test_flowmm_merge_weights(weights):
    view = flowmm_view(9)
    plan = get_method("flowmm", theta=0.0, merge_weights=weights).plan(view, 10)
    imp = view.window_attention.sum(axis=2)
    row = plan.merge_weight[0, 0]
    members = plan.merge_to[0, 0] >= 0
    piv = plan.keep[0, 0]
    if weights == "importance":
        np.testing.assert_allclose(row[members], imp[0, 0][members], rtol=1e-6)
        np.testing.assert_allclose(row[piv], imp[0, 0][piv], rtol=1e-6)
    elif weights == "mean":
        assert (row[members] == 1).all() and (row[piv] == 1).all()
    else:
        counts = np.bincount(plan.merge_to[0, 0][members], minlength=piv.size)
        assert (row[members] == 0.5).all()
        np.testing.assert_array_equal(row[piv], 1 + 0.5 * counts)


# --- HybridKV ---------------------------------------------------------------------------------------

def test_coverage_k():
    a = np.array([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_array_equal(coverage_k(a, 0.9), [3, 4])
    np.testing.assert_array_equal(coverage_k(a * 7, 0.5), [1, 2])   # mass is relative


def test_hybridkv_static_text_prior_and_dynamic_whole_chunks():
    rng = np.random.default_rng(10)
    L, Hk, g, T, d, W, c = 2, 2, 2, 300, 16, 4, 32
    keys = rng.standard_normal((L, Hk, T, d))
    q = aligned_queries(keys, [[150, 150], [150, 150]], g, W, strength=20.0)
    q[:, g:] *= 0.01                                          # KV head 1 of each layer: broad -> dynamic
    spans = (Span(0, 10, "text"), Span(10, 20, "text"), Span(20, 296, "media", 0), Span(296, 300, "text"))
    cand = np.zeros(T, bool)
    cand[10:296] = True                                        # 10 text candidates, then media
    view = KVView(keys.astype(np.float32), keys.astype(np.float32), cand, spans=spans, queries=q)
    plan = get_method("hybridkv").plan(view, 80)
    static = np.array(plan.info["static"])
    np.testing.assert_array_equal(static, [[True, False], [True, False]])
    assert plan.nominal.sum() == L * Hk * 80
    cands = np.flatnonzero(cand)
    for layer in range(L):
        s = kept(plan, layer, 0)
        assert set(range(10, 20)) <= s and 150 in s            # text first, then the attended media
        b = int(plan.nominal[layer, 1])
        rank = np.searchsorted(cands, plan.keep[layer, 1, :b])
        chunk_counts = np.bincount(rank // c, minlength=(cands.size + c - 1) // c)
        full = chunk_counts == c
        assert full.sum() == b // c and chunk_counts[~full].sum() == b % c


def test_hybridkv_r_moves_budget_between_head_types():
    rng = np.random.default_rng(11)
    L, Hk, g, T, d, W = 1, 4, 1, 200, 16, 4
    keys = rng.standard_normal((L, Hk, T, d))
    q = aligned_queries(keys, [[50, 60, 70, 80]], g, W, strength=20.0)
    q[:, 2:] *= 0.01
    view = media_view(keys, keys, q, text_tail=W)
    even = get_method("hybridkv").plan(view, 40).nominal[0]
    more_dyn = get_method("hybridkv", r=1.5).plan(view, 40).nominal[0]
    assert even[2:].sum() == 80 and more_dyn[2:].sum() == 120 and more_dyn.sum() == 160
