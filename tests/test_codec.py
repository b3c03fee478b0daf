"""KV state codec and packer on synthetic blobs (real llama.cpp blobs are covered in test_runtime.py)."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekv.errors import StateFormatError
from edgekv.kv.codec import GGML_TYPES, MAGIC, KVBlock, LayerKV, SeqState, parse_state, serialize_state
from edgekv.kv.dtypes import from_float, to_float
from edgekv.kv.packer import layer_floats, pack_block
from edgekv.methods.base import Plan


def make_block(rng, n_cells, n_layers, n_heads, d, k_type, v_type, v_trans, has_ext) -> KVBlock:
    layers = []
    for _ in range(n_layers):
        k = from_float(rng.normal(size=(n_cells, n_heads * d)).astype(np.float32), k_type)
        v = from_float(rng.normal(size=(n_cells, n_heads * d)).astype(np.float32), v_type)
        layers.append(LayerKV(k_type, k, v_type, v))
    ext = rng.integers(0, 50, size=(n_cells, 3)).astype(np.int32) if has_ext else None
    return KVBlock(pos=np.arange(n_cells, dtype=np.int32), seq_id=np.zeros(n_cells, np.int32), ext=ext,
                   v_trans=v_trans, layers=layers)


TYPES = [0, 1, 30, 8, 2]


@st.composite
def states(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    has_ext = draw(st.booleans())
    blocks = []
    for _ in range(draw(st.integers(1, 2))):
        v_trans = draw(st.booleans())
        k_type = draw(st.sampled_from(TYPES))
        v_type = draw(st.sampled_from([0, 1, 30] if v_trans else TYPES))  # transposed V is never quantized
        blocks.append(make_block(rng, draw(st.integers(0, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                                 32 * draw(st.integers(1, 2)), k_type, v_type, v_trans, has_ext))
    return SeqState(seq_id=draw(st.integers(0, 3)), blocks=blocks, has_ext=has_ext)


@settings(max_examples=60, deadline=None)
@given(states())
def test_round_trip_is_byte_exact(state):
    blob = serialize_state(state)
    parsed = parse_state(blob, has_ext=state.has_ext, n_blocks=len(state.blocks))
    assert serialize_state(parsed) == blob
    for a, b in zip(state.blocks, parsed.blocks):
        assert np.array_equal(a.pos, b.pos)
        for la, lb in zip(a.layers, b.layers):
            assert np.array_equal(la.k, lb.k) and np.array_equal(la.v, lb.v)


@settings(max_examples=40, deadline=None)
@given(states(), st.data())
def test_corrupt_blobs_are_rejected_cleanly(state, data):
    blob = bytearray(serialize_state(state))
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(StateFormatError):
        parse_state(bytes(blob[:cut]), has_ext=state.has_ext, n_blocks=len(state.blocks))
    with pytest.raises(StateFormatError):
        parse_state(bytes(blob) + b"\0", has_ext=state.has_ext, n_blocks=len(state.blocks))


def test_other_magic_is_rejected():
    blob = struct.pack("<Ii", 0x12345678, 0) + struct.pack("<II", 1, 0)
    with pytest.raises(StateFormatError, match="magic"):
        parse_state(blob)


def test_unknown_cache_type_is_rejected():
    rng = np.random.default_rng(0)
    state = SeqState(0, [make_block(rng, 3, 1, 1, 32, 1, 1, False, False)], False)
    blob = bytearray(serialize_state(state))
    k_hdr = 8 + 8 + 3 * 12 + 8  # magic+seq, stream+count, 3 cells meta, v_trans+n_layer
    struct.pack_into("<i", blob, k_hdr, 12)  # q4_K: not a cache type edgekv knows
    with pytest.raises(StateFormatError, match="not supported"):
        parse_state(bytes(blob))


@pytest.mark.parametrize("k_type,v_type,v_trans", [(1, 1, True), (1, 1, False), (8, 8, False), (2, 2, False),
                                                   (30, 30, True), (0, 0, False)])
def test_pack_writes_each_heads_own_tokens(k_type, v_type, v_trans):
    rng = np.random.default_rng(1)
    L, H, d, T = 2, 3, 32, 20
    block = make_block(rng, T, L, H, d, k_type, v_type, v_trans, has_ext=True)
    K, V = layer_floats(block, H)
    cand = np.ones(T, bool)
    cand[:2] = False
    cand[-3:] = False                                  # protected head and tail
    keep = np.stack([np.stack([rng.choice(np.arange(2, T - 3), 5, replace=False) for _ in range(H)])
                     for _ in range(L)])
    plan = Plan(keep=keep, nominal=np.full((L, H), 5))
    out, src = pack_block(block, plan, cand, H)
    assert np.array_equal(out.pos, block.pos[src])
    assert out.n_cells == 5 + 5
    assert np.all(np.diff(out.pos) > 0)
    assert out.pos.max() == block.pos.max()
    K2, V2 = layer_floats(out, H)
    slot_rows = np.flatnonzero(np.isin(out.pos, block.pos[cand]))
    for l in range(L):
        for h in range(H):
            # every head's slots hold exactly its selected tokens (as a set: slot order is free)
            got = {tuple(np.round(r, 4)) for r in K2[l, h, slot_rows]}
            want = {tuple(np.round(K[l, h, t], 4)) for t in keep[l, h]}
            assert got == want
            assert np.array_equal(K2[l, h, :2], K[l, h, :2]) and np.array_equal(V2[l, h, -3:], V[l, h, -3:])
    # protected cells keep their true positions; slot labels come from the candidate span
    assert set(out.pos[:2]) == {0, 1} and set(out.pos[-3:]) == {T - 3, T - 2, T - 1}
    assert np.array_equal(out.ext[:2], block.ext[:2])


def test_pack_merged_values_are_written():
    rng = np.random.default_rng(2)
    L, H, d, T = 1, 2, 32, 8
    block = make_block(rng, T, L, H, d, 1, 1, True, False)
    cand = np.ones(T, bool)
    cand[-1] = False
    plan = Plan(keep=np.array([[[0, 1], [2, 3]]]), nominal=np.full((1, 2), 2))
    mk = rng.normal(size=(L, H, 2, d)).astype(np.float32)
    mv = rng.normal(size=(L, H, 2, d)).astype(np.float32)
    out, _ = pack_block(block, plan, cand, H, merged=(mk, mv))
    K2, V2 = layer_floats(out, H)
    np.testing.assert_allclose(K2[0, :, :2], mk[0], atol=2e-3)
    np.testing.assert_allclose(V2[0, :, :2], mv[0], atol=2e-3)


@pytest.mark.parametrize("type_id", sorted(GGML_TYPES))
def test_dtype_round_trip_is_stable(type_id):
    x = np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32)
    b = from_float(x, type_id)
    assert np.array_equal(from_float(to_float(b, type_id), type_id), b)


def test_magic_constant():
    assert MAGIC == 0xAF143CD8
