"""Session(swa_budget=): the sliding-window block cut to a share of its cells (docs/memory.md)."""
from __future__ import annotations

import numpy as np
import pytest

from edgekv.errors import EdgeKVError
from edgekv.kv.codec import parse_state
from edgekv.kv.dtypes import to_float
from edgekv.methods.swa import swa_keep
from edgekv.runtime import Model, Session

from conftest import THREADS
from test_gemma import QUESTION, haystack


def reference_keep(K, pos, q, qpos, scale, n_swa, keep):
    """The docstring's formula written out cell by cell: per layer, each window row's softmax over the cells
    it can see, summed over rows and heads, normalised; mean over layers; max over +-3 neighbours."""
    L, Hq = q.shape[:2]
    T = len(pos)
    a = np.zeros((L, T))
    for il in range(L):
        for h in range(Hq):
            k = K[il][h * K[il].shape[0] // Hq]
            for j, pj in enumerate(qpos):
                vis = [i for i in range(T) if 0 <= pj - pos[i] < n_swa]
                z = np.array([float(q[il, h, j] @ k[i]) * scale for i in vis])
                e = np.exp(z - z.max())
                a[il, vis] += e / e.sum()
        a[il] /= a[il].sum()
    m = a.mean(0)
    s = np.array([m[max(0, i - 3):i + 4].max() for i in range(T)])
    own = pos >= qpos.min()
    s[own] = np.inf
    return np.sort(np.argsort(-s, kind="stable")[:max(keep, int(own.sum()))])


def test_swa_keep_matches_the_formula_and_keeps_the_window():
    rng = np.random.default_rng(0)
    L, Hkv, Hq, T, d, W = 3, 1, 4, 60, 8, 5
    K = rng.standard_normal((L, Hkv, T, d)).astype(np.float32)
    pos = np.arange(100, 100 + T)
    qpos = pos[-W:]
    q = rng.standard_normal((L, Hq, W, d)).astype(np.float32)
    for keep, n_swa in ((20, 512), (12, 40), (3, 512)):
        got = swa_keep(K, pos, q, qpos, 0.3, n_swa, keep)
        want = reference_keep(K, pos, q, qpos, 0.3, n_swa, keep)
        assert got.tolist() == want.tolist()
        assert set(range(T - W, T)) <= set(got.tolist())          # the window's own cells always stay
        assert len(got) == max(keep, W)
    assert swa_keep(K, pos, q, qpos, 0.3, 512, T).tolist() == list(range(T))


pytestmark_gemma = pytest.mark.gemma


@pytest.fixture(scope="module")
def gemma(gemma_path):
    with Model.load(gemma_path, n_ctx=2048, n_batch=512, threads=THREADS, flash_attn="off") as m:
        yield m


def _compacted(gemma, swa_budget, probe=False):
    s = Session(gemma, method="hybridkv", budget=0.25, auto_compact=False, swa_budget=swa_budget, compress="all")
    s.append_text(haystack(3000), compressible=True)
    s.append_text(QUESTION)
    before = parse_state(s.state_blob(), n_blocks=2)
    rows, n_past = s.cache.window_rows, s.cache.n_past
    r = s.compact(probe=probe) if probe else s.compact()
    return s, before, parse_state(s.state_blob(), n_blocks=2), r, rows, n_past


@pytestmark_gemma
def test_window_block_keeps_its_share_bit_identical(gemma):
    s, before, after, r, rows, n_past = _compacted(gemma, 0.25)
    sb, sa = before.blocks[1], after.blocks[1]
    assert sb.n_cells > 200 and sa.n_cells == round(0.25 * sb.n_cells)
    assert (r.info["swa_cells_before"], r.info["swa_cells_after"]) == (sb.n_cells, sa.n_cells)
    assert set(range(n_past - rows, n_past)) <= set(sa.pos.tolist())   # the question's own cells stay
    at = {int(p): i for i, p in enumerate(sb.pos)}
    idx = np.array([at[int(p)] for p in sa.pos])                       # kept cells: a subset, in order
    assert (np.diff(sa.pos) > 0).all()
    for lb, la in zip(sb.layers, sa.layers):                            # ... with the prefill's bytes
        assert np.array_equal(lb.k[idx], la.k) and np.array_equal(lb.v[idx], la.v)
    # the choice is the formula's on the captured window (in the window layers)
    K = [to_float(l.k, l.k_type).reshape(sb.n_cells, 1, -1).transpose(1, 0, 2) for l in sb.layers]
    lay = gemma.layout
    want = reference_keep(K, sb.pos.astype(np.int64), s.cache.window_q_swa, np.arange(n_past - rows, n_past),
                          lay.attn_scale, lay.n_swa, sa.n_cells)
    assert want.tolist() == idx.tolist()
    assert r.bytes_after == after.nbytes < before.nbytes - 0.5 * sb.nbytes
    # the conversation goes on from the thinned block: the answer's positions continue, cells are added
    text = "".join(x.text for x in s.generate(max_tokens=4, temperature=0.0))
    assert text and s.cache.n_past == n_past + 4
    grown = parse_state(s.state_blob(), n_blocks=2).blocks[1]
    assert grown.n_cells == sa.n_cells + 4 and grown.pos.max() == n_past + 3
    s.close()


@pytestmark_gemma
def test_swa_budget_one_and_a_probe_leave_the_window_block_whole(gemma):
    s1, _, _, r1, _, _ = _compacted(gemma, 1.0)
    blob1 = s1.state_blob()
    s1.close()
    s0 = Session(gemma, method="hybridkv", budget=0.25, auto_compact=False, compress="all")
    s0.append_text(haystack(3000), compressible=True)
    s0.append_text(QUESTION)
    s0.compact()
    assert s0.state_blob() == blob1 and "swa_cells_after" not in r1.info
    s0.close()
    # a probe's window block is put back after it: the setting does not apply before the question
    s = Session(gemma, method="hybridkv", budget=0.25, auto_compact=False, swa_budget=0.25, compress="all")
    s.append_text(haystack(3000), compressible=True)
    swa_before = parse_state(s.state_blob(), n_blocks=2).blocks[1]
    r = s.compact(probe=True)
    assert r is not None and "swa_cells_after" not in r.info
    assert parse_state(s.state_blob(), n_blocks=2).blocks[1].n_cells == swa_before.n_cells
    # ... then the question, which no compaction chooses with: its window thins the block before the answer
    s.append_text(QUESTION)
    n_past, rows = s.cache.n_past, s.cache.window_rows
    held = parse_state(s.state_blob(), n_blocks=2).blocks[1]
    assert s.cache.swa_due and rows > 0
    list(s.generate(max_tokens=3, temperature=0.0))
    got = parse_state(s.state_blob(), n_blocks=2).blocks[1]
    kept = got.pos[got.pos < n_past]
    assert len(kept) == round(0.25 * held.n_cells) and set(range(n_past - rows, n_past)) <= set(kept.tolist())
    assert not s.cache.swa_due
    s.close()


@pytestmark_gemma
@pytest.mark.parametrize("bad", [0.0, 1.5, -1])
def test_swa_budget_out_of_range_is_refused(gemma, bad):
    with pytest.raises(EdgeKVError, match="swa_budget"):
        Session(gemma, swa_budget=bad)


@pytestmark_gemma
def test_chat_swa_budget_flag(gemma_path):
    import re

    from click.testing import CliRunner

    from edgekv.cli.main import cli

    args = ["chat", "-m", str(gemma_path), "-p", haystack(3000) + QUESTION, "--method", "hybridkv", "--budget", "0.25",
            "--compress", "all", "-n", "4", "-t", str(THREADS), "-c", "2048", "-fa", "off"]
    r = CliRunner().invoke(cli, args + ["--swa-budget", "0.25"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = re.search(r"sliding-window layers (\d+) -> (\d+)", r.output)
    assert m and int(m.group(2)) == round(0.25 * int(m.group(1))) and int(m.group(1)) > 200, r.output
    bad = CliRunner().invoke(cli, args + ["--swa-budget", "0"])
    assert bad.exit_code == 2 and "Error: Invalid value for '--swa-budget'" in bad.output


def test_eval_method_swa_suffix():
    from edgekv.cli.eval_cmd import parse_methods
    from edgekv.eval.engine import split_swa

    assert parse_methods("hybridkv,hybridkv+swa0.25@before") == ("hybridkv", "hybridkv+swa0.25@before")
    assert split_swa("hybridkv+swa0.25") == ("hybridkv", 0.25) and split_swa("snapkv") == ("snapkv", 1.0)
    for bad in ("hybridkv+swa2", "hybridkv+swa", "nosuch+swa0.5"):
        with pytest.raises(EdgeKVError):
            parse_methods(bad)


@pytestmark_gemma
def test_eval_thins_the_window_block_in_its_swa_runs_only(gemma_path, tmp_path):
    """`edgekv eval --methods hybridkv,hybridkv+swa0.25`: one prefill per sample serves both runs; the +swa run
    (and only it) holds a quarter of the window block, so fewer bytes than the same budget with it whole."""
    from click.testing import CliRunner

    from edgekv.cli.main import cli
    from edgekv.eval.runner import load_records

    out = tmp_path / "ev"
    r = CliRunner().invoke(cli, ["eval", "-m", str(gemma_path), "--tasks", "passkey", "--lengths", "1k", "--depths", "0.5",
                                 "--samples", "1", "--methods", "hybridkv,hybridkv+swa0.25", "--budgets", "0.25",
                                 "-t", str(THREADS), "--out", str(out), "--no-progress", "--no-plots"])
    assert r.exit_code == 0, r.output
    by = {x["method"]: x for x in load_records(out)}
    whole, thin = by["hybridkv"], by["hybridkv+swa0.25"]
    assert "swa_cells_after" not in whole and thin["swa_cells_before"] > 200
    assert thin["swa_cells_after"] == round(0.25 * thin["swa_cells_before"])
    assert thin["cells_after"] == whole["cells_after"]          # the global block: the same plan
    assert thin["kv_bytes"] < whole["kv_bytes"] < by["full"]["kv_bytes"]


@pytestmark_gemma
def test_q8_0_cache_and_gemma_template_turns(gemma_path, monkeypatch):
    """On a q8_0 cache (llama.cpp rotates its keys, and the captured queries with them) through chat() with
    Gemma's own template, over two turns: every thinning keeps a quarter of the window block, the question's
    cells, the bytes the block held, and the formula's choice on the dequantized keys."""
    from edgekv.runtime import policy, regions, universe, window_block

    seen = []

    def spy(cache, rest):
        out, cells = window_block.thin_window_block(cache, rest)
        if cells is not None:
            seen.append((rest[0], out[0], cache.window_rows, cache.n_past, cache.window_q_swa))
        return out, cells

    for mod in (policy, regions, universe):
        monkeypatch.setattr(mod, "thin_window_block", spy)
    with Model.load(gemma_path, n_ctx=2048, n_batch=512, threads=THREADS, flash_attn="on", cache_type_k="q8_0",
                    cache_type_v="q8_0", chat_template="gemma") as m:
        s = Session(m, method="hybridkv", budget=0.25, compress="all", swa_budget=0.25)
        for text in (haystack(3000) + "\nWhat is the secret pass key?", "Say it again, please."):
            answer = "".join(r.text for r in s.chat(text, max_tokens=3))
            assert answer
        s.close()
    assert len(seen) == 2      # one per turn: the second question thins the block its own prefill refilled
    lay = m.layout
    for held, got, rows, n_past, q in seen:
        assert got.n_cells == round(0.25 * held.n_cells) and set(range(n_past - rows, n_past)) <= set(got.pos.tolist())
        at = {int(p): i for i, p in enumerate(held.pos)}
        idx = np.array([at[int(p)] for p in got.pos])
        for lh, lg in zip(held.layers, got.layers):
            assert lh.k_type == 8 and np.array_equal(lh.k[idx], lg.k)     # GGML q8_0, the bytes as held
        K = [to_float(l.k, l.k_type).reshape(held.n_cells, 1, -1).transpose(1, 0, 2) for l in held.layers]
        want = reference_keep(K, held.pos.astype(np.int64), q, np.arange(n_past - rows, n_past), lay.attn_scale,
                              lay.n_swa, got.n_cells)
        assert want.tolist() == idx.tolist()
