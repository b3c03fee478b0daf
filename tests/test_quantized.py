"""Quantized KV caches: llama.cpp stores K (and a quantized V) Hadamard-rotated (edgekv.kv.rotation), and
rotates Q inside attention. Captured queries must meet the cached keys the same way, and plans on a q8_0 /
q4_0 cache must be the f16 cache's plans up to the quantization noise."""
from __future__ import annotations

import collections
import re
from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg

from edgekv.kv.codec import parse_state
from edgekv.kv.dtypes import from_float, to_float
from edgekv.kv.packer import layer_floats
from edgekv.kv.rotation import DISABLE_ENV, KVRotation, hadamard, kv_rotation
from edgekv.methods import METHODS, KVView, Span, get_method, resolve_budget, uses_queries
from edgekv.runtime import Model, Session, lib

from conftest import THREADS, window_softmax

QUERY_AWARE = sorted(n for n in METHODS if uses_queries(n))
Q8_0, Q4_0 = 8, 2   # ggml type ids


# --- the rotation itself --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 64, 128, 256])
def test_hadamard_is_the_normalised_sylvester_matrix(n):
    h = hadamard(n)
    np.testing.assert_array_equal(h, scipy.linalg.hadamard(n) / np.sqrt(n))   # scipy builds Sylvester's
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)                 # orthonormal and symmetric


@pytest.mark.parametrize("types,dims,env,want", [
    (("f16", "f16"), (256, 256), None, (0, 0)),
    (("bf16", "f32"), (256, 256), None, (0, 0)),
    (("q8_0", "f16"), (256, 256), None, (256, 0)),
    (("q4_0", "q4_0"), (128, 128), None, (128, 64)),   # V: always blocks of 64
    (("q8_0", "q8_0"), (192, 192), None, (64, 64)),    # 192 = 3 x 64
    (("q8_0", "q8_0"), (320, 64), None, (64, 64)),
    (("q8_0", "q8_0"), (96, 96), None, (0, 0)),        # not a multiple of 64: not rotated
    (("q8_0", "q4_0"), (256, 256), "1", (0, 0)),
    (("q8_0", "q4_0"), (256, 256), " 2x", (0, 0)),     # atoi
    (("q8_0", "q4_0"), (256, 256), "0", (256, 64)),
    (("q8_0", "q4_0"), (256, 256), "yes", (256, 64)),  # atoi("yes") == 0: llama.cpp rotates
])
def test_rotation_rules_follow_llama_cpp(types, dims, env, want):
    environ = {} if env is None else {DISABLE_ENV: env}
    assert kv_rotation(*types, *dims, environ=environ) == KVRotation(*want)


def test_rotated_queries_are_the_block_diagonal_matrix():
    rot = KVRotation(k_block=64)
    q = np.random.default_rng(0).standard_normal((2, 3, 5, 192)).astype(np.float32)
    R = rot.key_matrix(192)
    np.testing.assert_allclose(R, scipy.linalg.block_diag(*[hadamard(64)] * 3))
    np.testing.assert_allclose(rot.rotate_queries(q), q @ R, atol=1e-5)
    assert KVRotation().rotate_queries(q) is q and KVRotation().key_matrix(192) is None


# --- methods in the rotated basis -----------------------------------------------------------------
def _views(seed: int = 0, d: int = 128) -> tuple[KVView, KVView]:
    """One cache seen twice: as computed, and as llama.cpp stores it rotated (K and Q by R_k, V by R_v)."""
    rng = np.random.default_rng(seed)
    L, Hk, H, T, W = 2, 2, 4, 96, 8
    keys = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    keys[..., 40:44, :] *= 3.0                     # a few salient tokens
    values = rng.standard_normal((L, Hk, T, d)).astype(np.float32)
    queries = rng.standard_normal((L, H, W, d)).astype(np.float32)
    cand = np.zeros(T, bool)
    cand[4:T - W] = True
    spans = (Span(0, 4, "text"), Span(4, 50, "media", 0), Span(50, T - W, "media", 1), Span(T - W, T, "text"))
    common = dict(spans=spans, positions=np.arange(T) + 7, rope_base=1e4, rope_neox=True, seed=3)
    plain = KVView(keys, values, cand, queries=queries, **common)
    rot = KVRotation(k_block=d, v_block=64)
    Rk, Rv = rot.key_matrix(d), np.kron(np.eye(d // 64), hadamard(64))
    rotated = KVView((keys @ Rk).astype(np.float32), (values @ Rv).astype(np.float32), cand,
                     queries=rot.rotate_queries(queries), key_rotation=Rk, **common)
    return plain, rotated


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_plans_the_same_on_a_rotated_cache(name):
    """Given the rotated queries (and, for Expected Attention, the rotation), every method's plan on the
    cache as llama.cpp stores it is the plan on the unrotated cache."""
    plain, rotated = _views()
    budget = 20
    want, got = get_method(name).plan(plain, budget), get_method(name).plan(rotated, budget)
    np.testing.assert_array_equal(got.keep, want.keep)
    np.testing.assert_array_equal(got.nominal, want.nominal)
    if want.merge_to is not None:
        np.testing.assert_array_equal(got.merge_to, want.merge_to)


def test_expected_attention_scores_are_unchanged_by_the_rotation():
    plain, rotated = _views(seed=1)
    m = get_method("expected", n_sink=0)
    np.testing.assert_allclose(m.score(rotated), m.score(plain), rtol=2e-4, atol=1e-9)
    # without the rotation it would un-RoPE rotated queries: a different, wrong distribution
    assert not np.allclose(m.score(replace(rotated, key_rotation=None)), m.score(plain), rtol=0.05)


def test_a_merged_rotated_slot_is_the_rotated_merged_slot():
    """Merging averages rows, so on a rotated cache it writes rotate(mean): the stored basis is kept."""
    from edgekv.methods.merge import merged_kv

    plain, rotated = _views(seed=2)
    plan = get_method("flowmm").plan(plain, 20)
    assert plan.merge_to is not None and (plan.merge_to >= 0).any()
    k0, v0 = merged_kv(plain.keys, plain.values, plan)
    k1, v1 = merged_kv(rotated.keys, rotated.values, plan)
    np.testing.assert_allclose(k1, k0 @ rotated.key_rotation, atol=1e-4)
    np.testing.assert_allclose(v1, v0 @ np.kron(np.eye(2), hadamard(64)), atol=1e-4)


# --- llama.cpp: a tiny model whose head dim (192) llama.cpp rotates in three blocks of 64 ----------
@pytest.fixture(scope="module")
def tiny192(tmp_path_factory):
    from edgekv.testing.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("rot") / "rot192.gguf", n_layer=2, n_embd=128, n_head=4,
                            n_head_kv=2, head_dim=192, n_ff=256, seed=0)


@pytest.fixture
def llama_log(monkeypatch) -> collections.deque:
    """All of llama.cpp's log lines from now on (lib keeps only the last 200)."""
    lines: collections.deque = collections.deque()
    monkeypatch.setattr(lib, "LOG_LINES", lines)
    return lines


def _rot_log(lines) -> list[tuple[int, int]]:
    """(attn_rot_k, attn_rot_v) of every KV cache llama.cpp logged creating in `lines`."""
    text = "".join(lines)
    return [(int(k), int(v)) for k, v in zip(re.findall(r"attn_rot_k = (\d)", text),
                                              re.findall(r"attn_rot_v = (\d)", text))]


def _softmax_check(m: Model, s: Session, prompt: str, q_scaled: bool) -> None:
    """softmax(captured window x dequantized cached keys) == llama.cpp's kq_soft_max. Without flash
    attention llama.cpp quantizes Q to q8_0 for its dot product with quantized keys: with that emulated
    the match is as close as for f16 caches (docs/architecture.md, query capture: 0.002), without it within the q8_0
    error of Q (measured 0.012-0.023 on Gemma)."""
    cap = m.capture
    cap.extra_prefixes, cap.extra = (b"kq_soft_max",), {}
    try:
        s.append_text(prompt, compressible=True)
        s.append_text(" and what is the secret?")
    finally:
        cap.extra_prefixes = ()
    lay = m.layout
    K, _ = layer_floats(parse_state(s.state_blob(), n_blocks=2 if lay.iswa else 1).blocks[0], lay.n_head_kv)
    Q = s.cache.window_q
    T = K.shape[2]
    for j, il in enumerate(lay.global_layers):
        ref = cap.extra[f"kq_soft_max-{il}"][..., :T]
        p = window_softmax(Q[j], K[j], lay.attn_scale)
        np.testing.assert_allclose(p, ref, atol=0.04)
        # llama.cpp's Q operand: Q as the graph holds it (Gemma scales it before attention) in q8_0
        q = Q[j] * lay.attn_scale if q_scaled else Q[j]
        q8 = to_float(from_float(q.reshape(-1, q.shape[-1]), Q8_0), Q8_0).reshape(q.shape)
        p8 = window_softmax(q8, K[j], 1.0 if q_scaled else lay.attn_scale)
        np.testing.assert_allclose(p8, ref, atol=2e-3)   # measured <= 9e-4 (AVX-512 build), 2e-6 (other)
        assert (p8.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("ctk,disable", [("q8_0", False), ("q4_0", False), ("q8_0", True)])
def test_tiny_captured_queries_reproduce_llama_attention_on_a_quantized_cache(tiny192, ctk, disable, llama_log,
                                                                               monkeypatch):
    if disable:
        monkeypatch.setenv(DISABLE_ENV, "1")
    with Model.load(tiny192, n_ctx=512, n_batch=512, threads=THREADS, flash_attn="off", cache_type_k=ctk) as m:
        want = KVRotation() if disable else KVRotation(k_block=64)
        assert m.rotation == want and _rot_log(llama_log) == [(int(not disable), 0)]
        s = Session(m, method="snapkv", auto_compact=False, window=8)
        _softmax_check(m, s, "the quick brown fox jumps over the lazy dog " * 12, q_scaled=False)
        s.close()


def test_llama_attn_rot_disable_is_read_when_the_context_is_created(tiny192, monkeypatch, llama_log):
    monkeypatch.setenv(DISABLE_ENV, "1")
    with Model.load(tiny192, n_ctx=256, threads=THREADS, flash_attn="on", cache_type_k="q8_0",
                    cache_type_v="q8_0") as m:
        assert m.rotation == KVRotation() and m.capture.rotation == KVRotation() and _rot_log(llama_log) == [(0, 0)]
        monkeypatch.delenv(DISABLE_ENV)
        llama_log.clear()
        m.resize_context(512)                  # a new context: llama.cpp reads the variable again
        assert m.rotation == KVRotation(64, 64) and m.capture.rotation == m.rotation and _rot_log(llama_log) == [(1, 1)]


# --- the real Gemma 3 270M: head dim 256 (one block), iSWA, 3 global layers -------------------------
NEEDLE = "The secret pass key is 71432. Remember it."
QUESTION = "\nQuestion: what is the secret pass key?\nAnswer: The secret pass key is"
BUDGET = 0.5
CONFIGS = {"off": [("q8_0", "f16"), ("q4_0", "f16")],       # a quantized V needs flash attention
           "on": [("q8_0", "q8_0"), ("q4_0", "q4_0")]}


def haystack(n_chars: int = 2000) -> tuple[str, str]:
    """Real text that ships offline (the stdlib's own source) around the needle: (before, after)."""
    import inspect
    from pathlib import Path

    text = Path(inspect.getsourcefile(inspect)).read_text()[:n_chars]
    return text[:n_chars // 2] + "\n", "\n" + text[n_chars // 2:]


@pytest.mark.gemma
@pytest.mark.parametrize("ctk", ["q8_0", "q4_0"])
def test_gemma_captured_queries_reproduce_llama_attention_on_a_quantized_cache(gemma_path, ctk, llama_log):
    """Gemma scales Q before attention, and its head dim 256 is one Hadamard block."""
    with Model.load(gemma_path, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="off", cache_type_k=ctk) as m:
        assert m.rotation == KVRotation(k_block=256) and _rot_log(llama_log) == [(1, 0), (1, 0)]  # global + SWA caches
        s = Session(m, method="snapkv", auto_compact=False, window=8)
        _softmax_check(m, s, "".join(haystack(1200)), q_scaled=True)
        s.close()


def _recording(name: str):
    """The method `name` with its plan() (through `auto`'s pick too) recording (view, plan)."""
    meth, seen = get_method(name), []

    def wrap(m):
        inner = m.plan
        m.plan = lambda view, budget: seen.append((m, view, inner(view, budget))) or seen[-1][2]
        return m

    if hasattr(meth, "resolve"):
        resolve = meth.resolve
        meth.resolve = lambda view: wrap(resolve(view))
        return meth, seen
    return wrap(meth), seen


def _cells(plan) -> set[tuple[int, int, int]]:
    return {(layer, head, int(t)) for (layer, head, _), t in np.ndenumerate(plan.keep)}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _stored_like(view: KVView, rot: KVRotation, type_k: int, type_v: int | None) -> KVView:
    """An f16 cache's view with K (and V) put through what llama.cpp does to store them in a quantized
    cache (rotate, quantize, dequantize), rotated back: the plan on it differs from the f16 plan by the
    quantization noise of the keys alone."""
    def stored(x: np.ndarray, block: int, type_id: int) -> np.ndarray:
        d = x.shape[-1]
        R = np.kron(np.eye(d // block), hadamard(block))
        flat = (x @ R).astype(np.float32).reshape(-1, d)
        return (to_float(from_float(flat, type_id), type_id).reshape(x.shape) @ R.T).astype(np.float32)

    keys = stored(view.keys, rot.k_block, type_k)
    values = view.values if type_v is None or not view.values.any() else stored(view.values, rot.v_block, type_v)
    return replace(view, keys=keys, values=values)


def _run(path, fa: str, ctk: str, ctv: str) -> dict:
    """Prefill the needle prompt on a cache of these types, then for every query-aware method: compact
    (from the same prefill), the plan, the greedy answer, and whether the needle cells are kept."""
    out = {}
    with Model.load(path, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn=fa, cache_type_k=ctk,
                    cache_type_v=ctv) as m:
        s = Session(m, method="full", auto_compact=False)
        before, after = haystack()
        s.append_text(before, compressible=True)
        start = s.n_cells
        s.append_text(NEEDLE, compressible=True)
        toks = m.tokenize(NEEDLE, special=False)
        digits = [start + i for i, t in enumerate(toks) if m.detokenize([t]).strip().isdigit()]
        s.append_text(after, compressible=True)
        s.append_text(QUESTION)
        snap = s.snapshot()
        out["full"] = "".join(r.text for r in s.generate(max_tokens=6))
        for name in QUERY_AWARE:
            s.restore(snap)
            meth, seen = _recording(name)
            s.compact(meth, BUDGET)
            planner, view, plan = seen[-1]
            kept = all(np.isin(t, plan.keep).any() for t in digits)   # in some (layer, head) row
            out[name] = (planner, view, plan, "".join(r.text for r in s.generate(max_tokens=6)), kept)
        s.close()
        out["rotation"] = m.rotation
    return out


@pytest.mark.gemma
@pytest.mark.parametrize("fa", ["off", "on"])
def test_plans_on_quantized_caches_match_the_f16_plan(gemma_path, fa):
    """The issue's check: for the same prompt, every query-aware method plans on a q8_0 cache what it plans
    on f16 (Jaccard of the kept (layer, head, cell) triples >= 0.9; measured 0.955-0.996) and keeps the
    needle (the answer has it, or every needle digit is kept in some row). q4_0 changes the keys
    themselves too much for 0.9: the f16 plan on its own keys stored as q4_0 (`_stored_like`) reaches
    Jaccard 0.80-0.97 with f16, and the q4_0 cache's plan must come within 0.15 of that (measured 0.78-0.98;
    q4_0 also shifts every layer's hidden states). On q4_0 the needle is required of the default `auto`
    only: `expected` (flash attention off) and `flowmm` (on) lost it on this prompt, as q4_0 noise. Before
    the fix (queries not rotated) Jaccard was 0.25-0.6 for most methods, on q8_0 and q4_0 alike."""
    ref = _run(gemma_path, fa, "f16", "f16")
    assert "71432" in ref["full"]
    report, bad = [], []
    for ctk, ctv in CONFIGS[fa]:
        got = _run(gemma_path, fa, ctk, ctv)
        type_k = Q8_0 if ctk == "q8_0" else Q4_0
        type_v = None if ctv == "f16" else type_k
        assert got["rotation"].keys and got["rotation"].values == (type_v is not None)
        for name in QUERY_AWARE:
            planner, view, plan, answer, kept = ref[name]
            _, _, qplan, qanswer, qkept = got[name]
            j = _jaccard(_cells(plan), _cells(qplan))
            floor = 0.9
            if ctk == "q4_0":
                noisy = _stored_like(view, got["rotation"], type_k, type_v)
                noise_plan = planner.plan(noisy, resolve_budget(BUDGET, view.n_candidates))
                floor = _jaccard(_cells(plan), _cells(noise_plan)) - 0.15
            lost = "71432" in got["full"] and ("71432" in answer or kept) and not ("71432" in qanswer or qkept)
            report.append(f"{fa} {ctk}/{ctv} {name}: J={j:.3f} (floor {floor:.3f}) {answer!r}->{qanswer!r} "
                          f"needle cells {kept}->{qkept}" + (" LOST" if lost else ""))
            bad += [report[-1]] if j < floor or (lost and (ctk == "q8_0" or name == "auto")) else []
    print("\n".join(report))
    assert not bad, "\n".join(bad)
