"""Issue 20: the recall store and re-selection per question, on the real llama.cpp.

References are independent of the code under test: the state blob llama.cpp wrote at prefill (a
recalled row must be one of its rows, byte for byte), a session without recall (budget 100 %), the full
cache's answer (Gemma, needle follow-up), and the file system (the store's file after exit)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from edgekv.errors import EdgeKVError
from edgekv.kv.codec import parse_state
from edgekv.kv.store import RecallStore, RecallStoreError
from edgekv.runtime import Model, Session
from edgekv.runtime.cache import PACKED

from conftest import THREADS


def load(pairs, variant="qwen2vl", **kw) -> Model:
    model, mmproj, _ = pairs[variant]
    return Model.load(model, mmproj, n_ctx=4096, n_batch=2048, threads=THREADS, flash_attn="off", **kw)


def image_turn(s: Session, img, question="Describe the image.") -> None:
    """An image and its question, prefilled (the question's window captured), not compacted."""
    s.append_prompt(s.format_chat([{"role": "user", "content": "<__media__>\n" + question}]), [img])


def head_rows(block, il: int, h: int, n_heads: int, which: str = "k") -> np.ndarray:
    rows = getattr(block.layers[il], which)
    return rows.reshape(rows.shape[0], n_heads, -1)[:, h]


def as_set(rows: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in rows}


# --- the store on its own -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def block(tiny_pairs):
    """A real state block: the tiny qwen2vl after an image (M-RoPE ext included)."""
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        image_turn(s, tiny_pairs["qwen2vl"][2])
        b = parse_state(s.state_blob(), has_ext=True).blocks[0]
        s.close()
    return b


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_the_store_gives_back_the_bytes_it_took(block, mode, tmp_path):
    st = RecallStore(mode, tmp_path if mode == "disk" else None)
    idx = np.arange(3, block.n_cells, 5)
    st.add(block, idx[:10], np.arange(10), np.zeros(10, np.int32))
    st.add(block, idx[10:], np.arange(10, len(idx)), np.ones(len(idx) - 10, np.int32))
    back = st.rows()
    assert st.n == len(idx) and st.nbytes == len(idx) * sum(l.k_row + l.v_row for l in block.layers)
    for old, new in zip(block.layers, back.layers):
        assert np.array_equal(old.k[idx], new.k) and np.array_equal(old.v[idx], new.v)
    assert np.array_equal(back.pos, block.pos[idx]) and np.array_equal(back.ext, block.ext[idx])
    st.truncate(12)       # cuts the second batch: its checksums are made again over its first 2 rows
    for old, new in zip(block.layers, st.rows().layers):
        assert np.array_equal(old.k[idx[:12]], new.k) and np.array_equal(old.v[idx[:12]], new.v)
    f = st.fork(12)
    assert f.n == 12 and np.array_equal(f.rows().layers[0].k, block.layers[0].k[idx[:12]])
    if mode == "disk":
        path = st.path
        assert path.exists() and path.parent == tmp_path
        st.close()
        assert not path.exists()
    f.close()


def test_a_changed_or_cut_store_file_is_a_clear_error(block, tmp_path):
    st = RecallStore("disk", tmp_path)
    st.add(block, np.arange(20), np.arange(20), np.zeros(20, np.int32))
    with open(st.path, "r+b") as fh:
        fh.seek(5)
        fh.write(b"\xff\xfe")
    with pytest.raises(RecallStoreError, match="changed"):
        st.rows()
    os.truncate(st.path, 10)
    with pytest.raises(RecallStoreError, match="cut"):
        st.rows()
    os.unlink(st.path)
    with pytest.raises(RecallStoreError, match="gone"):
        st.rows()


def test_a_lower_row_type_is_close_and_smaller(block):
    exact, q8 = RecallStore("ram"), RecallStore("ram", row_type="q8_0")
    idx = np.arange(block.n_cells)
    for st in (exact, q8):
        st.add(block, idx, idx, np.zeros(len(idx), np.int32))
    assert q8.nbytes < exact.nbytes
    from edgekv.kv.dtypes import to_float

    a = to_float(exact.rows().layers[0].k, block.layers[0].k_type)
    b = to_float(q8.rows().layers[0].k, block.layers[0].k_type)
    assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()
    with pytest.raises(EdgeKVError, match="--recall-type"):
        RecallStore("ram", row_type="q5_1")


# --- re-selection ---------------------------------------------------------------------------------

def test_a_recalled_cell_comes_back_as_the_original_rows(tiny_pairs):
    """Compact for one question, then ask another: the cells the second question brings back are rows
    of the blob llama.cpp wrote at prefill, byte for byte, in the (layer, head) that chose them."""
    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="ram", auto_compact=False)
        image_turn(s, img)
        full = parse_state(s.state_blob(), has_ext=True).blocks[0]
        n_media = int((s.cache.media >= 0).sum())
        r1 = s.compact()
        assert r1 is not None and not r1.reselect and r1.store_cells == n_media
        list(s.generate(max_tokens=2))
        after1 = parse_state(s.state_blob(), has_ext=True).blocks[0]
        list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=2))
        r2 = s.reports[-1]
        assert r2.reselect and r2.rewritten and r2.recalled > 0 and r2.reprefill_tokens > 0
        after2 = parse_state(s.state_blob(), has_ext=True).blocks[0]
        H = m.layout.n_head_kv
        slots = np.flatnonzero(s.cache.kind == PACKED)
        assert len(slots) <= r2.budget_cells
        new_rows = 0
        for il in range(full.n_layers):
            for h in range(H):
                for which in ("k", "v"):
                    orig = as_set(head_rows(full, il, h, H, which))
                    got = as_set(head_rows(after2, il, h, H, which)[slots])
                    assert got <= orig   # every slot holds an original row
                had = as_set(head_rows(after1, il, h, H))
                new_rows += len(as_set(head_rows(after2, il, h, H)[slots]) - had)
        assert new_rows > 0      # some rows were not in the context after the first question
        s.close()


def test_a_min_share_gate_keeps_the_context_when_too_little_attention_comes_back(tiny_pairs):
    """recall_min_share: the share of a head's window attention that the cells coming back would hold is
    reported; under the gate nothing is written and nothing prefilled again (the blob is the one before
    the question's re-selection, the answer the one without recall); a gate at 0 rewrites as before."""
    _, _, img = tiny_pairs["qwen2vl"]
    out = {}
    with load(tiny_pairs) as m:
        for name, kw in (("off", {}), ("open", dict(recall="ram", recall_min_share=0.0)),
                         ("shut", dict(recall="ram", recall_min_share=0.999))):
            s = Session(m, method="snapkv", budget=0.25, auto_compact=False, **kw)
            image_turn(s, img)
            s.compact()
            list(s.generate(max_tokens=2))
            q = s.model.tokenize("And what is in the bottom right corner, exactly?", add_bos=False, special=False)
            s.append_tokens(q)
            before = s.state_blob()
            toks = [r.token for r in s.generate(max_tokens=3)]
            out[name] = (s.reports[-1], before, s.state_blob(), toks)
            s.close()
    r_open, r_shut = out["open"][0], out["shut"][0]
    assert r_open.reselect and r_open.rewritten and r_open.recalled > 0
    share = r_open.info["recall_share"]
    assert 0 < share <= 1 and r_shut.info["recall_share"] == share     # the same window, the same choice
    assert r_shut.reselect and not r_shut.rewritten and r_shut.recalled == 0 and r_shut.reprefill_tokens == 0
    _, before, after, toks = out["shut"]
    assert out["off"][3] == toks                         # answered on the context recall off has
    n_before, n_after = (len(parse_state(b, has_ext=True).blocks[0].pos) for b in (before, after))
    assert n_after == n_before + 3                       # the three answer tokens, nothing rewritten
    with pytest.raises(EdgeKVError, match="recall_min_share"):
        with load(tiny_pairs) as m:
            Session(m, recall="ram", recall_min_share=1.5)


def test_at_full_budget_recall_changes_nothing(tiny_pairs):
    _, _, img = tiny_pairs["qwen2vl"]
    out = {}
    with load(tiny_pairs) as m:
        for recall in ("off", "ram"):
            s = Session(m, method="snapkv", budget=1.0, recall=recall)
            a1 = [r.token for r in s.chat("Describe the image.", images=[img], max_tokens=4)]
            a2 = [r.token for r in s.chat("What else is there?", max_tokens=4)]
            out[recall] = (a1, a2, s.state_blob())
            s.close()
    assert out["off"] == out["ram"]


def test_tokens_appended_by_hand_choose_again_before_sampling(tiny_pairs):
    """append_tokens then generate(): the question chooses again before the first token is sampled; when
    the choice is the context's, nothing is rewritten and nothing prefilled again."""
    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="ram", auto_compact=False)
        image_turn(s, img, "What is in the corner?")
        s.compact()
        q = s.model.tokenize("What is in the corner?", add_bos=False, special=False)
        s.append_tokens(q)
        blob = s.state_blob()
        list(s.generate(max_tokens=1))   # re-selects before sampling (the low-level path)
        r = s.reports[-1]
        assert r.reselect
        if not r.rewritten:
            assert r.recalled == 0 and r.reprefill_tokens == 0
            assert parse_state(s.state_blob(), has_ext=True).blocks[0].layers[0].k.tobytes().startswith(
                parse_state(blob, has_ext=True).blocks[0].layers[0].k.tobytes())
        s.close()


def test_a_failed_turn_takes_its_rows_out_of_the_store(tiny_pairs):
    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="ram")
        list(s.chat("Describe the image.", images=[img], max_tokens=2))
        n0, blob = s.cache.store.n, s.state_blob()
        snap = s.snapshot()
        with pytest.raises(EdgeKVError):
            list(s.chat("And this one?", images=[img], max_tokens=2, temperature=-1))
        assert s.cache.store.n == n0 and s.state_blob() == blob
        list(s.chat("And this one?", images=[img], max_tokens=2))
        assert s.cache.store.n > n0
        s.restore(snap)      # an earlier moment: its own copy of the store's first rows
        assert s.cache.store.n == n0 and s.cache.store is not snap.marks.store
        assert snap.marks.store.n > n0      # the later branch's rows are untouched
        s.close()


def test_a_missing_store_file_leaves_the_conversation_usable(tiny_pairs, tmp_path):
    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="disk", recall_dir=tmp_path)
        list(s.chat("Describe the image.", images=[img], max_tokens=2))
        path = s.cache.store.path
        assert path.exists() and s.cache.store.n > 0
        path.unlink()
        out = list(s.chat("What is in the corner?", max_tokens=3))
        assert out[-1].finish_reason in ("length", "stop")
        assert s.cache.store.n == 0 and not (s.cache.cid == -1).any()   # recall of those cells is off
        assert "gone" in s.recall_error
        out = list(s.chat("Describe the image.", images=[img], max_tokens=2))   # and recall works again
        assert out[-1].finish_reason in ("length", "stop") and s.cache.store.n > 0
        s.close()


@pytest.mark.parametrize("how", ["exit", "ctrl-c"])
def test_the_store_file_is_gone_after_exit(tiny_pairs, tmp_path, how):
    model, mmproj, img = tiny_pairs["qwen2vl"]
    script = textwrap.dedent(f"""
        import sys, time
        from edgekv.runtime import Model, Session
        m = Model.load({str(model)!r}, {str(mmproj)!r}, n_ctx=4096, n_batch=2048, threads=1, flash_attn="off")
        s = Session(m, method="snapkv", budget=0.25, recall="disk")
        list(s.chat("Describe the image.", images=[{str(img)!r}], max_tokens=1))
        print(s.cache.store.path, flush=True)
        sys.stdin.readline() if {how == "exit"!r} else time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    path = p.stdout.readline().strip()
    assert path and os.path.exists(path)
    if how == "ctrl-c":
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
    else:
        p.stdin.write("\n")
        p.stdin.flush()
    p.wait(timeout=60)
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


# --- the real Gemma: a follow-up about a fact the first compaction evicted ----------------------------

def needle_doc() -> str:
    """About 440 Gemma tokens of the Python reference with two facts, a third and two thirds in."""
    from edgekv.eval.corpus import filler_paragraphs

    body = " ".join(filler_paragraphs()[40:52])
    a, b = len(body) // 3, 2 * len(body) // 3
    return (body[:a] + " The pass key is 74193. Remember it. " + body[a:b]
            + " The secret animal is a pelican. Remember it. " + body[b:])


def follow_up(m: Model, recall: str, budget: float, blobs: list | None = None, **kw) -> tuple[str, list]:
    """The two needle questions in turn; `blobs` gets the state blob at the end; kw: more Session options."""
    s = Session(m, method="hybridkv", budget=budget, recall=recall, **kw)
    s.append_text(needle_doc(), compressible=True)
    s.append_text("\nWhat is the pass key? The pass key is")
    s.compact()
    first = "".join(r.text for r in s.generate(max_tokens=6))
    s.append_text("\nWhat is the secret animal? The secret animal is a")
    second = "".join(r.text for r in s.generate(max_tokens=4))
    reports = list(s.reports)
    if blobs is not None:
        blobs.append(s.state_blob())
    s.close()
    return first + "|" + second, reports


def test_a_follow_up_about_an_evicted_fact_answers_as_the_full_cache(gemma_path):
    with Model.load(str(gemma_path), n_ctx=4096, threads=THREADS) as m:
        full, _ = follow_up(m, "off", 1.0)
        off, _ = follow_up(m, "off", 0.1)
        ram, reports = follow_up(m, "ram", 0.1)
    assert "pelican" in full.split("|")[1]
    assert "pelican" not in off.split("|")[1]     # without recall the first choice lost it (the control)
    assert ram.split("|")[1] == full.split("|")[1]
    r = reports[-1]
    assert r.reselect and r.recalled > 0 and r.reprefill_tokens > 0


def test_on_gemma_the_question_is_removed_exactly_from_the_sliding_window(gemma_path):
    """The re-prefill cut drops the question's cells from both blocks: the sliding-window cells before
    the question are the ones the question was first prefilled on, byte for byte."""
    with Model.load(str(gemma_path), n_ctx=4096, threads=THREADS) as m:
        s = Session(m, method="snapkv", budget=0.1, recall="ram")
        s.append_text(needle_doc(), compressible=True)
        s.append_text("\nWhat is the pass key?")
        s.compact()
        list(s.generate(max_tokens=2))
        p0 = s.cache.n_past
        s.append_text("\nWhat is the secret animal? The secret animal is a")
        before = parse_state(s.state_blob(), n_blocks=2).blocks[1]
        list(s.generate(max_tokens=1))
        r = s.reports[-1]
        assert r.reselect and r.reprefill_tokens > 0
        after = parse_state(s.state_blob(), n_blocks=2).blocks[1]
        both = np.intersect1d(before.pos, after.pos)
        old = np.flatnonzero(np.isin(before.pos, both[both < p0]))
        new = np.flatnonzero(np.isin(after.pos, both[both < p0]))
        assert len(old) > 100 and np.array_equal(before.pos[old], after.pos[new])
        for a, b in zip(before.layers, after.layers):
            assert np.array_equal(a.k[old], b.k[new]) and np.array_equal(a.v[old], b.v[new])
        q_old = np.flatnonzero(np.isin(before.pos, both[both >= p0]))
        q_new = np.flatnonzero(np.isin(after.pos, both[both >= p0]))
        assert len(q_old) > 5      # the question's cells, prefilled again on the new context, differ
        assert any(not np.array_equal(a.k[q_old], b.k[q_new]) for a, b in zip(before.layers, after.layers))
        s.close()


def test_a_question_after_a_streamed_clip_chooses_across_every_frame(tiny_pairs, tmp_path):
    """Every frame is compacted right after its prefill (query-agnostic); its compacted cells go to the
    store, and the question then chooses among all of them in the budget-sized context: cells of more
    than one frame come back, and the context does not grow."""
    from test_video import make_clip

    from edgekv.runtime.streaming import Video

    clip = make_clip(tmp_path / "clip.mp4", n=8, fps=4, w=224, h=224)
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="ram", probe=False)
        list(s.chat("What happens?", videos=[Video(clip, fps=4)], max_tokens=2))
        early = [r for r in s.reports if r.early]
        r = s.reports[-1]
        assert len(early) >= 2 and not r.early and r.reselect
        stored = s.cache.store
        # every frame's cells (a chunk's last cell joins at the question), but the one the question follows
        assert stored.n == sum(e.n_candidates + 1 for e in early) - 1
        assert len(set(stored.media.tolist())) == len(early)
        assert r.recalled > 0 and r.reprefill_tokens > 0
        assert r.cells_after == r.cells_before                        # the context did not grow
        s.close()


def test_a_ram_store_counts_against_the_servers_conversation_cache(tiny_pairs):
    import dataclasses

    from edgekv.server.convcache import snapshot_nbytes

    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="ram")
        list(s.chat("Describe the image.", images=[img], max_tokens=2))
        snap = s.snapshot().without_logits()
        bare = dataclasses.replace(snap, marks=dataclasses.replace(snap.marks, store=None, store_n=0))
        assert s.cache.store.nbytes > 0
        assert snapshot_nbytes(snap) - snapshot_nbytes(bare) == s.cache.store.nbytes
        s.close()


@pytest.mark.parametrize("method", ["snapkv", "flowmm"])
def test_choosing_again_with_the_same_window_writes_nothing(tiny_pairs, method):
    """A re-selection reads merged slots' originals from the store, never the merged rows: with the same
    question window the second choice is the first one, and nothing is written (flowmm merges)."""
    from edgekv.methods import get_method

    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method=method, budget=0.25, recall="ram", auto_compact=False)
        image_turn(s, img)
        s.compact()
        s.append_text("\nWhat is in the bottom right corner?")
        c = s.cache
        c.run = None                       # no question prefill again here: the same window both times
        held = int((c.kind == PACKED).sum())
        r1 = c.compact(get_method(method), held, cand=s.candidates(), use_queries=True, seed=0, universe=True, cap=True)
        blob = s.state_blob()
        r2 = c.compact(get_method(method), held, cand=s.candidates(), use_queries=True, seed=0, universe=True, cap=True)
        assert r1.reselect and r2.reselect and not r2.rewritten and r2.recalled == 0
        assert s.state_blob() == blob
        assert r1.merged == (method == "flowmm")
        s.close()


@pytest.mark.parametrize("reprefill", ["question", "last"])
def test_a_prefill_again_keeps_every_position(tiny_pairs, reprefill):
    """Cells come back, the question (or its last token) is prefilled again at its own positions: the
    conversation ends at the same position as without recall, with no cell twice."""
    _, _, img = tiny_pairs["qwen2vl"]
    ends = {}
    with load(tiny_pairs) as m:
        for recall in ("off", "ram"):
            s = Session(m, method="snapkv", budget=0.25, recall=recall, recall_reprefill=reprefill)
            list(s.chat("Describe the image.", images=[img], max_tokens=3))
            list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=3))
            pos = parse_state(s.state_blob(), has_ext=True).blocks[0].pos
            ends[recall] = (s.cache.n_past, s.n_cells, len(np.unique(pos)) == len(pos) or None)
            if recall == "ram":
                r = s.reports[-1]
                assert r.reselect and r.reprefill_tokens == (1 if reprefill == "last" else r.reprefill_tokens) > 0
            s.close()
    assert ends["off"][0] == ends["ram"][0]


def test_a_bad_recall_dir_is_one_error_line_before_anything_runs(tiny_pairs, tmp_path):
    """--recall-dir that is a file: one `Error:` line, exit 2, before the first turn (not mid-compaction)."""
    import subprocess

    model, mmproj, img = tiny_pairs["qwen2vl"]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    r = subprocess.run([sys.executable, "-c", "from edgekv.cli.main import main; main()", "chat", "-m", str(model),
                        "--mmproj", str(mmproj), "--image", str(img), "-p", "hi", "-n", "2", "-t", str(THREADS),
                        "--recall", "disk", "--recall-dir", str(not_a_dir)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and "--recall-dir" in errors[0], r.stderr
    with load(tiny_pairs) as m:                     # the Session refuses it when it is made
        with pytest.raises(EdgeKVError, match="--recall-dir"):
            Session(m, recall="disk", recall_dir=not_a_dir)


def test_gemma_chat_template_follow_up_turns_with_recall(gemma_path):
    """Real Gemma with llama.cpp's gemma template, chat() turns: the follow-up chooses again, its text run
    (template tokens included) is prefilled again at its own positions (the same as without recall), and
    a third turn still re-renders the history against the cache."""
    from edgekv.errors import SessionError  # noqa: F401  (a template mismatch would raise it)

    ends, blobs = {}, {}
    with Model.load(str(gemma_path), n_ctx=4096, threads=THREADS, chat_template="gemma") as m:
        for recall in ("off", "ram", "disk"):     # disk: the context goes through state files (spill.py)
            s = Session(m, method="hybridkv", budget=0.1, recall=recall, compress="all")
            list(s.chat(needle_doc() + "\n\nWhat is the pass key?", max_tokens=6))
            list(s.chat("What is the secret animal?", max_tokens=6))
            if recall != "off":
                r = s.reports[-1]
                assert r.reselect and r.rewritten and r.recalled > 0 and r.reprefill_tokens > 5
            list(s.chat("Thanks. Anything else?", max_tokens=3))
            assert [x["role"] for x in s.messages] == ["user", "assistant"] * 3
            ends[recall], blobs[recall] = s.cache.n_past, s.state_blob()
            s.close()
    assert ends["off"] == ends["ram"] == ends["disk"]
    assert blobs["disk"] == blobs["ram"]


def test_on_a_q8_0_gemma_cache_recalled_rows_are_the_prefills(gemma_path):
    """A quantized (q8_0, rotated) K/V cache on the sliding-window Gemma: every packed slot after a
    re-selection holds, byte for byte, a row llama.cpp wrote at prefill, and some came from the store."""
    with Model.load(str(gemma_path), n_ctx=4096, threads=THREADS, flash_attn="on",
                    cache_type_k="q8_0", cache_type_v="q8_0") as m:
        s = Session(m, method="hybridkv", budget=0.1, recall="ram", auto_compact=False)
        s.append_text(needle_doc(), compressible=True)
        s.append_text("\nWhat is the pass key? The pass key is")
        full = parse_state(s.state_blob(), n_blocks=2).blocks[0]
        s.compact()
        list(s.generate(max_tokens=4))
        after1 = parse_state(s.state_blob(), n_blocks=2).blocks[0]
        s.append_text("\nWhat is the secret animal? The secret animal is a")
        list(s.generate(max_tokens=2))
        r = s.reports[-1]
        assert r.reselect and r.rewritten and r.recalled > 0
        after2 = parse_state(s.state_blob(), n_blocks=2).blocks[0]
        slots = np.flatnonzero(s.cache.kind == PACKED)
        H = m.layout.n_head_kv
        came_back = 0
        for il in range(full.n_layers):
            for h in range(H):
                for which in ("k", "v"):
                    assert as_set(head_rows(after2, il, h, H, which)[slots]) <= as_set(head_rows(full, il, h, H, which))
                came_back += len(as_set(head_rows(after2, il, h, H)[slots]) - as_set(head_rows(after1, il, h, H)))
        assert came_back > 0
        s.close()


def test_the_report_line_says_what_the_question_did():
    from edgekv.cli.report import recall_line
    from edgekv.runtime.compactor import CompactionReport

    base = dict(resolved="snapkv", budget_cells=10, n_candidates=40, cells_before=50, cells_after=20,
                bytes_before=5000, bytes_after=2000, seconds=0.1, plan_seconds=0.01, nominal_mean=10.0,
                nominal_max=10, merged=False, window=8, store_cells=40, store_bytes=4096, store_where="RAM",
                reselect=True)
    back = CompactionReport(**base, recalled=7, reprefill_tokens=5, info={"recall_share": 0.4})
    gated = CompactionReport(**base, rewritten=False, info={"recall_share": 0.04})
    same = CompactionReport(**base, rewritten=False, info={})
    assert recall_line(back).endswith("brought back 7 cells, 5 question tokens prefilled again")
    assert "held 0.04 of a head's attention, under --recall-min-share" in recall_line(gated)
    assert recall_line(same).endswith("kept the context's cells (nothing rewritten)")
    assert recall_line(same).startswith("recall      store 40 cells, ") and "in RAM" in recall_line(same)
