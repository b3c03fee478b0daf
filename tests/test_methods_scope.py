"""What a method says it reads (Method.view_cells / reads_keys / reads_values) is all it reads: for every
registered method, the plan the runtime makes on the reduced view (only the candidates, or a zero-byte
placeholder for K or V) is identical, bit for bit, to the plan on the whole cache, and so is the packed
block. A method that reads more than it declares fails here."""
from __future__ import annotations

import numpy as np
import pytest

from edgekv.kv.codec import KVBlock, LayerKV, SeqState, parse_state, serialize_state
from edgekv.kv.packer import layer_floats, pack_block
from edgekv.methods import METHODS, KVView, Span, get_method
from edgekv.runtime.compactor import _plan_to_cells, method_view

# (L, H_kv, H, d, W, spans, packed cells); a packed cell is protected, as earlier frames' slots are
CASES = {
    "frame-after-packed": (3, 2, 6, 16, 6, (Span(0, 3, "text"), Span(3, 40, "media", 0), Span(40, 42, "text"),
                                            Span(42, 80, "media", 1), Span(80, 86, "text")), range(3, 40)),
    "two-images": (2, 3, 3, 8, 4, (Span(0, 2, "text"), Span(2, 30, "media", 0), Span(30, 33, "text"),
                                   Span(33, 61, "media", 1), Span(61, 66, "text")), ()),
}


def make_block(L, Hk, d, T, seed, v_trans):
    rng = np.random.default_rng(seed)
    layers = [LayerKV(1, rng.standard_normal((T, Hk * d)).astype(np.float16).view(np.uint8),
                      1, rng.standard_normal((T, Hk * d)).astype(np.float16).view(np.uint8)) for _ in range(L)]
    return KVBlock(pos=np.arange(T, dtype=np.int32) * 2, seq_id=np.zeros(T, np.int32), ext=None,
                   v_trans=v_trans, layers=layers)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_reduced_view_plans_like_the_whole_cache(name, case):
    L, Hk, H, d, W, spans, packed = CASES[case]
    T = spans[-1].stop
    cand = np.zeros(T, bool)
    for s in spans:
        cand[s.start:s.stop] = s.kind == "media"
    cand[list(packed)] = False
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((L, H, W, d)).astype(np.float32)
    block = parse_state(serialize_state(SeqState(0, [make_block(L, Hk, d, T, 2, True)], False)), copy=False).blocks[0]
    K, V = layer_floats(block, Hk)
    whole = KVView(K, V, cand, spans=spans, queries=queries, positions=block.pos.astype(np.int64), seed=3)
    meth = get_method(name)
    if getattr(meth, "resolve", None):
        meth = meth.resolve(whole)
    budget = max(1, int(cand.sum()) // 4)
    want = meth.plan(whole, budget)
    view, cells = method_view(meth, block, Hk, cand, spans, queries, whole.scale, 3)
    got = meth.plan(view, budget)
    if cells is not None:
        got = _plan_to_cells(got, cells, T)
    np.testing.assert_array_equal(got.keep, want.keep)
    np.testing.assert_array_equal(got.nominal, want.nominal)
    for a, b in ((got.merge_to, want.merge_to), (got.merge_weight, want.merge_weight)):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert got.info == want.info
    out, src = pack_block(block, got, cand, Hk)
    ref, ref_src = pack_block(block, want, cand, Hk)
    np.testing.assert_array_equal(src, ref_src)
    assert serialize_state(SeqState(0, [out], False)) == serialize_state(SeqState(0, [ref], False))


def test_parse_without_copy_is_views_and_read_only():
    block = make_block(2, 2, 8, 10, 0, False)
    blob = serialize_state(SeqState(0, [block], False))
    parsed = parse_state(blob, copy=False).blocks[0]
    assert not parsed.layers[0].k.flags.owndata and not parsed.layers[0].k.flags.writeable
    np.testing.assert_array_equal(parsed.layers[1].v, block.layers[1].v)


@pytest.mark.parametrize("name", ["snapkv", "hybridkv", "adakv", "pyramidkv", "keydiff"])
def test_methods_that_read_by_layer_never_hold_every_layer_in_floats(name):
    """The runtime's view makes K floats a layer at a time (LayerFloats): a method that reads by layer
    plans as on whole arrays (the test above) and at no time holds more than a few layers, so planning
    over recall's universe of every stored cell holds about a layer of floats, not the store."""
    L, Hk, H, d, W = 12, 2, 4, 16, 4
    T = 200
    cand = np.zeros(T, bool)
    cand[2:190] = True
    spans = (Span(0, 2, "text"), Span(2, 190, "media", 0), Span(190, T, "text"))
    queries = np.random.default_rng(1).standard_normal((L, H, W, d)).astype(np.float32)
    block = make_block(L, Hk, d, T, 2, False)
    meth = get_method(name)
    view, _ = method_view(meth, block, Hk, cand, spans, queries, 0.25, 3)
    held = []
    cls = type(view.keys)
    layer, head = cls.layer, cls.head

    def spy_layer(self, il):
        out = layer(self, il)
        held.append(len(self._held) + len(self._head_floats) / self.shape[1])   # in layers' worth
        return out

    def spy_head(self, il, h):
        out = head(self, il, h)
        held.append(len(self._held) + len(self._head_floats) / self.shape[1])
        return out

    cls.layer, cls.head = spy_layer, spy_head
    try:
        meth.plan(view, 40)
    finally:
        cls.layer, cls.head = layer, head
    assert view.keys._full is None and held and max(held) <= 3 < L


@pytest.mark.parametrize("type_name", ["q4_0", "q8_0", "f16"])
def test_layer_floats_made_a_slice_of_rows_at_a_time_are_the_whole_conversion(type_name):
    """LayerFloats converts a layer `_ROWS` rows at a time (a quantized type's dequantization makes several
    temporaries of its input's size): the floats are those of converting every row at once."""
    from edgekv.kv.codec import TYPE_IDS, KVBlock, LayerKV
    from edgekv.kv.dtypes import from_float, to_float
    from edgekv.kv.packer import LayerFloats

    rng = np.random.default_rng(0)
    tid, Hk, d = TYPE_IDS[type_name], 2, 32
    T = 2 * LayerFloats._ROWS + 123
    rows = [from_float(rng.standard_normal((T, Hk * d)).astype(np.float32), tid) for _ in range(2)]
    block = KVBlock(pos=np.arange(T, dtype=np.int32), seq_id=np.zeros(T, np.int32), ext=None, v_trans=False,
                    layers=[LayerKV(tid, r, tid, r) for r in rows])
    cells = rng.permutation(T)[:T - 50]
    for sel in (None, cells):
        lf = LayerFloats(block, Hk, sel, "k")
        for il in range(2):
            want = to_float(rows[il] if sel is None else rows[il][sel], tid).reshape(-1, Hk, d).transpose(1, 0, 2)
            np.testing.assert_array_equal(lf.layer(il), want)
        heads = LayerFloats(block, Hk, sel, "k")     # a head at a time: from that head's bytes alone
        for il in range(2):
            want = to_float(rows[il] if sel is None else rows[il][sel], tid).reshape(-1, Hk, d)
            for h in range(Hk):
                np.testing.assert_array_equal(heads[il, h], want[:, h])
                np.testing.assert_array_equal(heads[il, h, 7], want[7, h])
        assert not heads._held and len(heads._head_floats) <= LayerFloats._HELD_HEADS


def test_hybridkv_plans_a_layer_at_a_time():
    """hybridkv's scores over many cells (recall's universe): its temporaries stay a few layers' worth, well
    under one [L, H_kv, n] float64 array (they were several such arrays, the re-selection's peak)."""
    import tracemalloc

    from edgekv.methods import KVView

    L, Hk, H, W, T = 24, 2, 4, 8, 20_000
    cand = np.zeros(T, bool)
    cand[4:T - 8] = True
    spans = (Span(0, 4, "text"), Span(4, T - 8, "media", 0), Span(T - 8, T, "text"))
    view = KVView(np.zeros((L, Hk, T, 1), np.float32), np.zeros((L, Hk, T, 1), np.float32), cand, spans=spans,
                  queries=np.zeros((L, H, W, 1), np.float32))
    rng = np.random.default_rng(0)
    view.__dict__["_window_reductions"] = (rng.random((L, Hk, T)).astype(np.float32),
                                           rng.random((L, Hk, W)).astype(np.float32))
    tracemalloc.start()
    try:
        plan = get_method("hybridkv").plan(view, 3000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one = L * Hk * T * 8
    assert plan.keep.shape == (L, Hk, 3000) and peak < 0.6 * one, (peak, one)


def test_the_window_attention_over_a_big_block_holds_a_few_heads_of_floats():
    """The window pass reads K one (layer, head) at a time: over recall's universe it holds a few heads of
    float32 keys (it held three whole layers), and lets them go when done; the scores are the ones of the
    whole float array."""
    import tracemalloc

    L, Hk, H, d, W, T = 6, 4, 8, 64, 4, 6000
    cand = np.zeros(T, bool)
    cand[2:T - 8] = True
    spans = (Span(0, 2, "text"), Span(2, T - 8, "media", 0), Span(T - 8, T, "text"))
    queries = np.random.default_rng(1).standard_normal((L, H, W, d)).astype(np.float32)
    block = make_block(L, Hk, d, T, 8, False)             # f16 rows
    meth = get_method("snapkv")
    view, _ = method_view(meth, block, Hk, cand, spans, queries, 0.125, 3)
    tracemalloc.start()
    try:
        scores = np.array(view.window_scores)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    layer_bytes = Hk * T * d * 4
    assert peak < 1.5 * layer_bytes, (peak, layer_bytes)
    assert not view.keys._held and not view.keys._head_floats
    whole, _ = method_view(meth, block, Hk, cand, spans, queries, 0.125, 3)
    np.asarray(whole.keys)     # the whole float array, made once
    np.testing.assert_allclose(scores, whole.window_scores, rtol=1e-6, atol=1e-7)
