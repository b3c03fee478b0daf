"""A conversation that never corrupts (issue 9): turns as transactions, cancel, honest per-turn stats,
fresh logits after an image, query-agnostic early compaction, one live session per model, -b smaller
than the window. All on the real llama.cpp with the tiny generated models."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgekv.errors import Cancelled, ContextOverflowError, EdgeKVError, SessionError
from edgekv.runtime import Model, Session

from conftest import THREADS

ROOT = Path(__file__).resolve().parents[1]


def load(pairs, variant="llava", n_ctx=4096, n_batch=2048, fa="off") -> Model:
    model, mmproj, _ = pairs[variant]
    return Model.load(model, mmproj, n_ctx=n_ctx, n_batch=n_batch, threads=THREADS, flash_attn=fa)


def roles(s: Session) -> list[str]:
    return [m["role"] for m in s.messages]


def answer_until(s: Session, prompt: str, n_tokens: int, images=(), **gen) -> list:
    """Stream a turn and stop it (break, as a Stop button does) once n_tokens answer tokens are decoded."""
    out = []
    for r in s.chat(prompt, list(images), **gen):
        out.append(r)
        if r.generation_tokens >= n_tokens:
            break
    return out


# --- 1. turns are transactions ------------------------------------------------------------------------

def test_stopped_answer_is_kept_and_the_next_turn_sees_the_same_cache(tiny_pairs):
    """Breaking out after 3 tokens keeps them as the assistant's message; turn 2 then runs on exactly the
    cache a turn that ended at 3 tokens by itself would have (bit-identical logits, flash attention off)."""
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        out = answer_until(s, "Tell me a story.", 3, max_tokens=50)
        n = out[-1].generation_tokens
        assert 3 <= n < 10 and out[-1].finish_reason is None
        assert roles(s) == ["user", "assistant"]
        assert s.messages[-1]["content"] == "".join(r.text for r in out)
        n_cells = s.n_cells
        turn2 = list(s.chat("And then?", max_tokens=4))
        assert roles(s) == ["user", "assistant", "user", "assistant"]
        assert turn2[-1].prompt_tokens == s.n_cells - n_cells - turn2[-1].generation_tokens
        got_tokens, got_logits = [r.token for r in turn2], s.logits.copy()
        s.close()

        ref = Session(m, method="full")
        full = list(ref.chat("Tell me a story.", max_tokens=n))
        assert full[-1].finish_reason == "length"
        assert "".join(r.text for r in full) == s.messages[1]["content"]
        ref_turn2 = list(ref.chat("And then?", max_tokens=4))
        assert [r.token for r in ref_turn2] == got_tokens
        np.testing.assert_array_equal(ref.logits, got_logits)
        ref.close()


def test_failed_turn_leaves_cache_and_messages_as_before(tiny_pairs):
    """An image that no longer fits, after the turn's text was prefilled: ContextOverflowError, and the
    cache is byte-identical to before the turn (the prefilled text is removed again)."""
    image = tiny_pairs["llava"][2]
    with load(tiny_pairs, n_ctx=200) as m:
        s = Session(m, method="snapkv", early_compact=False)
        list(s.chat("hello", max_tokens=3))
        before = (s.state_blob(), s.n_cells, s.cache.n_past, [dict(x) for x in s.messages], s.prompt_tokens)
        with pytest.raises(ContextOverflowError):
            list(s.chat("what is this?", [image], max_tokens=3))
        assert (s.state_blob(), s.n_cells, s.cache.n_past, s.messages, s.prompt_tokens) == before
        # and the conversation goes on normally
        out = list(s.chat("again", max_tokens=2))
        assert roles(s) == ["user", "assistant"] * 2 and out[-1].finish_reason in ("length", "stop")
        s.close()


def test_failure_after_a_compaction_inside_the_turn_rolls_back(tiny_pairs, monkeypatch):
    """Turn 2 compacts its image, then fails while answering: the rewritten cache is rolled back too."""
    image = tiny_pairs["llava"][2]
    with load(tiny_pairs) as m:
        probe = m.tokenize(" one two three", special=False)
        s = Session(m, method="snapkv", budget=0.25)
        list(s.chat("Look at this.", [image], max_tokens=3))
        blob, msgs, n_reports = s.state_blob(), [dict(x) for x in s.messages], len(s.reports)

        def broken(*a, **k):
            raise RuntimeError("sampler failed")

        monkeypatch.setattr("edgekv.runtime.generate.sample", broken)
        with pytest.raises(RuntimeError, match="sampler failed"):
            list(s.chat("And this one?", [image], max_tokens=3))
        monkeypatch.undo()
        assert s.state_blob() == blob and s.messages == msgs and len(s.reports) == n_reports
        after = s.eval_logits(probe)
        s.close()

        ref = Session(m, method="snapkv", budget=0.25)
        list(ref.chat("Look at this.", [image], max_tokens=3))
        np.testing.assert_array_equal(ref.eval_logits(probe), after)
        ref.close()


# --- 3. cancel ----------------------------------------------------------------------------------------

def test_cancel_from_another_thread_stops_the_answer_and_keeps_it(tiny_pairs):
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        go = threading.Event()
        t = threading.Thread(target=lambda: (go.wait(10), s.cancel()))
        t.start()
        out = []
        for r in s.chat("Tell me a long story.", max_tokens=100):
            out.append(r)
            if r.generation_tokens >= 2 and not go.is_set():
                go.set()
                t.join()
        assert out[-1].finish_reason == "cancelled"
        n = out[-2].generation_tokens
        assert 2 <= n < 10 and out[-1].generation_tokens == n and out[-1].token == -1   # nothing after
        assert s.n_cells == out[-1].prompt_tokens + n
        assert roles(s) == ["user", "assistant"]
        assert s.messages[-1]["content"] == "".join(r.text for r in out)
        # the next turn is not cancelled by the old request
        assert list(s.chat("more", max_tokens=2))[-1].finish_reason in ("length", "stop")
        s.close()


def test_cancel_during_prefill_aborts_llama_decode_and_restores(tiny_pairs):
    """cancel() while a long prompt is prefilled (here from the progress callback after the first batch):
    llama.cpp's abort callback stops the next decode, chat raises Cancelled, nothing of the turn stays."""
    with load(tiny_pairs, n_batch=64) as m:
        seen = []

        def progress(stage, done, total):
            seen.append((stage, done, total))
            if done >= 64:
                s.cancel()

        s = Session(m, method="full", progress=progress)
        list(s.chat("hi", max_tokens=2))
        before = (s.state_blob(), s.n_cells, [dict(x) for x in s.messages])
        seen.clear()
        with pytest.raises(Cancelled):
            list(s.chat("word " * 400, max_tokens=2))
        assert seen and seen[0][0] == "prefill" and seen[-1][1] < seen[-1][2]  # stopped part-way
        assert (s.state_blob(), s.n_cells, s.messages) == before
        s.progress = None
        assert list(s.chat("ok", max_tokens=2))[-1].finish_reason in ("length", "stop")
        s.close()


def test_progress_reports_image_chunks(tiny_pairs):
    image = tiny_pairs["llava-tiles"][2]
    with load(tiny_pairs, "llava-tiles") as m:
        seen = []
        s = Session(m, method="snapkv", progress=lambda *a: seen.append(a))
        list(s.chat("describe", [image], max_tokens=1))
        images = [x for x in seen if x[0] == "image"]
        assert images == [("image", i + 1, 10) for i in range(10)]
        s.close()


def test_a_second_thread_cannot_start_a_turn_inside_a_running_one(tiny_pairs):
    with load(tiny_pairs, n_batch=64) as m:
        errors = []

        def progress(stage, done, total):
            if not errors:  # another thread tries to prefill while this turn is half-way
                t = threading.Thread(target=lambda: _try(lambda: s.append_text("intruder"), errors))
                t.start()
                t.join()

        s = Session(m, method="full", progress=progress)
        out = list(s.chat("word " * 200, max_tokens=2))
        assert len(errors) == 1 and isinstance(errors[0], SessionError) and "another thread" in str(errors[0])
        assert out[-1].finish_reason in ("length", "stop") and roles(s) == ["user", "assistant"]
        s.close()


def _try(fn, errors):
    try:
        fn()
        errors.append(None)
    except Exception as e:
        errors.append(e)


# --- 2. -b smaller than the window ----------------------------------------------------------------------

def test_batch_smaller_than_the_window(tiny_pairs):
    with load(tiny_pairs, n_batch=8) as m:
        s = Session(m, method="snapkv", window=32)
        out = list(s.chat("hi there, a question that is longer than eight tokens", max_tokens=3))
        assert out[-1].finish_reason in ("length", "stop")
        assert s.cache.window_rows == 8               # the window is clipped to one batch
        s.close()


# --- 4. stats -------------------------------------------------------------------------------------------

def test_per_turn_stats_count_prompt_and_answer_apart(tiny_pairs):
    image = tiny_pairs["llava"][2]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, auto_compact=False)
        out = list(s.chat("What is in the image?", [image], max_tokens=5))
        last = out[-1]
        n_answer = last.generation_tokens
        assert s.n_cells == last.prompt_tokens + n_answer          # no compaction: every cell accounted
        assert last.prompt_tokens >= 256 and last.prompt_seconds > 0 and last.generation_seconds > 0
        # the last record does not repeat the previous token (a token with no text yet gets no record)
        assert len({r.generation_tokens for r in out}) == len(out) and out[-1].token != out[-2].token
        assert len({r.token for r in out if r.token >= 0}) <= n_answer
        assert s.messages[-1]["content"] == "".join(r.text for r in out)
        cells = s.n_cells
        out2 = list(s.chat("Thanks.", max_tokens=2))
        assert out2[-1].prompt_tokens == s.n_cells - cells - out2[-1].generation_tokens < 40
        assert s.prompt_tokens == last.prompt_tokens + out2[-1].prompt_tokens
        s.clear()
        assert (s.prompt_tokens, s.generation_tokens, s.n_cells, s.messages, s.reports) == (0, 0, 0, [], [])
        s.close()


def test_report_shows_only_this_turns_compaction(tiny_pairs):
    from edgekv.cli.report import format_report

    image = tiny_pairs["llava"][2]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25)
        list(s.chat("What is it?", [image], max_tokens=2))
        n = len(s.reports)
        out = list(s.chat("Thanks.", max_tokens=2))
        text = format_report(s, out[-1], s.reports[n:])
        assert "nothing compacted this turn" in text and "method" not in text
        assert f"prefill     {out[-1].prompt_tokens} tokens" in text
        s.close()


# --- 5. logits after an image ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llava", "qwen2vl"])
def test_prompt_ending_with_an_image_never_samples_stale_logits(tiny_pairs, variant):
    """mtmd requests no logits for image batches: after a prompt that ends with an image the previous
    text's logits must not be used (they were); generating says why, and text after the image fixes it."""
    image = tiny_pairs[variant][2]
    with load(tiny_pairs, variant) as m:
        s = Session(m, method="full", auto_compact=False)
        s.append_text("look: ")
        before = s.logits.copy()
        s.append_prompt("<__media__>", [image])
        if variant == "llava":    # the image's embeddings are the last cells: no logits to sample from
            with pytest.raises(EdgeKVError, match="ends with an image"):
                s.logits
            with pytest.raises(EdgeKVError, match="ends with an image"):
                list(s.generate(max_tokens=2))
        else:                     # qwen2vl's template closes the image with text tokens: fresh logits
            assert not np.array_equal(s.logits, before)
        s.append_text(" what?")
        assert not np.array_equal(s.logits, before)
        assert list(s.generate(max_tokens=2))[-1].finish_reason in ("length", "stop")
        s.close()


# --- 6. early compaction is query-agnostic ---------------------------------------------------------------

def test_early_compaction_between_two_images_is_query_agnostic(tiny_pairs):
    from edgekv.methods.auto import QUERY_AGNOSTIC

    image = tiny_pairs["llava"][2]
    with load(tiny_pairs, n_ctx=512) as m:
        s = Session(m, method="auto", budget=0.25, probe=False)
        out = list(s.chat("compare", [image, image], max_tokens=2))
        assert out[-1].finish_reason in ("length", "stop")
        early = [r for r in s.reports if r.early]
        assert early and all(r.window == 0 for r in early)         # the "\n" between images is no question
        assert all(r.auto and r.resolved == QUERY_AGNOSTIC for r in early)
        assert s.reports[-1].window > 0                            # the real question is used after
        s.close()
        # with the default probe (runtime/probe.py) the window is the probe's, never the "\n"
        s = Session(m, method="auto", budget=0.25)
        list(s.chat("compare", [image, image], max_tokens=2))
        early = [r for r in s.reports if r.early]
        assert early and all(r.probe == "generic" and r.window == r.info["probe_tokens"] for r in early)
        s.close()


# --- 7. one session per model, no use after close --------------------------------------------------------

def test_second_session_on_one_model_is_refused(tiny_pairs):
    with load(tiny_pairs) as m:
        a = Session(m, method="full")
        list(a.chat("hi", max_tokens=2))
        cells = a.n_cells
        with pytest.raises(SessionError, match="already has a live Session"):
            Session(m, method="full")
        assert a.n_cells == cells and len(a.state_blob()) > 0      # a's cache was not cleared
        a.close()
        b = Session(m, method="full")                              # after close: fine
        b.close()


def test_use_after_close_is_a_clear_error(tiny_pairs):
    m = load(tiny_pairs)
    s = Session(m, method="full")
    list(s.chat("hi", max_tokens=2))
    m.close()
    with pytest.raises(SessionError, match="model was closed"):
        list(s.chat("again", max_tokens=2))
    with pytest.raises(SessionError, match="model was closed"):
        s.state_blob()
    with pytest.raises(EdgeKVError):
        Session(m)
    s.close()
    m2 = load(tiny_pairs)
    s2 = Session(m2, method="full")
    s2.close()
    with pytest.raises(SessionError, match="session was closed"):
        list(s2.chat("hi"))
    m2.close()


# --- 8. importable without POSIX-only modules ----------------------------------------------------------

def test_imports_and_runs_without_resource_and_fork_hooks(tiny_pairs):
    """As on Windows: no `resource` module, no os.register_at_fork."""
    model, mmproj, image = tiny_pairs["llava"]
    code = f"""
import os, sys, random                  # the stdlib's own fork hooks check hasattr(os, "fork")
sys.modules["resource"] = None          # import resource -> ImportError
del os.register_at_fork
from edgekv.runtime import Model, Session
import edgekv.cli.main, edgekv.methods
with Model.load({str(model)!r}, {str(mmproj)!r}, n_ctx=2048, threads=2, flash_attn="off") as m:
    s = Session(m, method="snapkv")
    out = list(s.chat("hi", [{str(image)!r}], max_tokens=2))
    print("ok", out[-1].finish_reason, out[-1].peak_memory_mb >= 0)
    s.close()
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("ok ")


# --- sampling and stop strings --------------------------------------------------------------------------

def test_stop_string_never_appears_and_is_not_in_the_cache(tiny_pairs):
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        free = "".join(r.text for r in s.chat("Tell me a story.", max_tokens=12))
        s.close()
        assert len(free) >= 6
        stop = free[4:6]                                            # a piece the greedy answer spells
        s = Session(m, method="full")
        out = list(s.chat("Tell me a story.", max_tokens=12, stop=[stop]))
        text = "".join(r.text for r in out)
        assert out[-1].finish_reason == "stop"
        assert text == free[:free.index(stop)] and stop not in text
        assert s.messages[-1]["content"] == text
        # the cache holds only the tokens whose text was shown, and the logits after the last of them
        kept = s.n_cells - out[-1].prompt_tokens
        assert kept == s.generation_tokens and 1 <= kept <= out[-1].generation_tokens
        got = s.logits.copy()
        cached = s.history.text
        s.close()
        ref = Session(m, method="full")
        ref_out = list(ref.chat("Tell me a story.", max_tokens=kept))
        ref_text = "".join(r.text for r in ref_out)
        assert text.startswith(ref_text) and cached.endswith(ref_text)
        np.testing.assert_array_equal(ref.logits, got)
        ref.close()


def test_top_k_and_min_p(tiny_pairs):
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        s.append_text("hello")
        logits = s.logits
        rng = np.random.default_rng(0)
        top1 = int(np.argmax(logits))
        assert {s.sample(logits, 1.0, 1.0, rng, top_k=1) for _ in range(20)} == {top1}
        assert {s.sample(logits, 5.0, 1.0, rng, min_p=0.999) for _ in range(20)} == {top1}
        top3 = set(np.argsort(-logits)[:3].tolist())
        assert {s.sample(logits, 100.0, 1.0, rng, top_k=3) for _ in range(200)} <= top3
        with pytest.raises(EdgeKVError, match="min_p"):
            list(s.generate(min_p=1.5))
        with pytest.raises(EdgeKVError, match="unknown generation option"):
            list(s.chat("x", max_token=3))
        s.close()


def test_readme_python_api_snippet_runs(tiny_pairs, tmp_path):
    """docs/python-api.md's stop / cancel / save-load snippet, verbatim, on the tiny llava pair."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    section = text[text.index("A conversation never ends up half-done"):]
    code = section[section.index("```python\n") + 10:]
    code = code[:code.index("```")]
    model, mmproj, image = tiny_pairs["llava"]
    env = {"MODEL": str(model), "MMPROJ": str(mmproj), "IMAGE": str(image), "SAVED": str(tmp_path / "c.edgekv")}
    exec(compile(code, "docs/python-api.md", "exec"), env)
    assert (tmp_path / "c.edgekv").exists()


@pytest.mark.gemma
def test_gemma_stop_cancel_save_continue_identically(gemma_path, tmp_path):
    """On Gemma 3 (iSWA: a sliding-window block next to the global one, compress="all" so the text itself
    is compacted): a stopped answer, a cancelled part-way prefill and a save/load keep the conversation
    bit-identical to one that never saw them (flash attention off)."""
    story = "Write a short poem about the sea and the wind."
    with Model.load(gemma_path, n_ctx=2048, n_batch=128, threads=THREADS, flash_attn="off") as m:
        s = Session(m, method="snapkv", compress="all", budget=0.5)
        out = answer_until(s, story, 3, max_tokens=40)
        n = out[-1].generation_tokens
        blob, msgs = s.state_blob(), [dict(x) for x in s.messages]

        def cancel_after_first_batch(stage, done, total):
            if done >= 128:
                s.cancel()

        s.progress = cancel_after_first_batch
        with pytest.raises(Cancelled):
            list(s.chat("Now a long one: " + "waves " * 400, max_tokens=4))
        s.progress = None
        assert s.state_blob() == blob and s.messages == msgs
        path = s.save(tmp_path / "gemma.edgekv")
        turn2 = list(s.chat("Shorter please.", max_tokens=6))
        want_tokens, want_logits = [r.token for r in turn2], s.logits.copy()
        s.close()

        ref = Session(m, method="snapkv", compress="all", budget=0.5)
        assert "".join(r.text for r in ref.chat(story, max_tokens=n)) == msgs[1]["content"]
        ref_turn2 = list(ref.chat("Shorter please.", max_tokens=6))
        assert [r.token for r in ref_turn2] == want_tokens
        np.testing.assert_array_equal(ref.logits, want_logits)
        ref.close()

        loaded = Session.load(m, path)
        assert [r.token for r in loaded.chat("Shorter please.", max_tokens=6)] == want_tokens
        np.testing.assert_array_equal(loaded.logits, want_logits)
        loaded.close()


@pytest.mark.gemma
@pytest.mark.parametrize("fail_at", ["prefill", "answer"])
def test_gemma_failed_turn_restores_the_sliding_window_block(gemma_path, monkeypatch, fail_at):
    """Gemma 3's sliding-window block: a long turn makes llama.cpp overwrite cells masked for its newest
    positions, and the turn's compaction writes back a blob without them; seq_rm alone could not bring
    them back (measured: it could not). The turn-start checkpoint of that block does: byte-identical."""
    words = " ".join(f"item{i}" for i in range(150))
    with Model.load(gemma_path, n_ctx=1024, n_batch=128, threads=THREADS, flash_attn="off") as m:
        s = Session(m, method="knorm", compress="all", budget=0.25)
        list(s.chat("Remember these: " + words, max_tokens=2))
        blob, msgs, cells = s.state_blob(), [dict(x) for x in s.messages], s.n_cells
        more = "More: " + words          # ~500 cells more: the turn overwrites masked window cells

        def boom(*a, **k):
            raise RuntimeError("boom")

        if fail_at == "prefill":   # after the whole prompt was decoded, before its compaction
            s.progress = lambda stage, done, total: boom() if done == total else None
        else:                      # after the compaction, while answering
            monkeypatch.setattr("edgekv.runtime.generate.sample", boom)
        with pytest.raises(RuntimeError, match="boom"):
            list(s.chat(more, max_tokens=2))
        monkeypatch.undo()
        s.progress = None
        assert s.state_blob() == blob and s.messages == msgs and s.n_cells == cells
        s.close()


def test_append_history_prefills_whole_messages_like_the_turns_that_made_them(tiny_pairs):
    """A conversation the cache does not hold (a server request's history) goes in as whole messages: the
    cache then holds the text the turns left, and the next turn starts as it did after them."""
    model_path, mmproj, image = tiny_pairs["llava"]
    with load(tiny_pairs) as m:
        s = Session(m, budget=1.0, seed=0)   # nothing evicted: the same text gives the same cells
        assert "".join(r.text for r in s.chat("what is this?", [image], max_tokens=3))
        history, text, cells = [dict(x) for x in s.messages], s.history.text, s.n_cells
        first = next(iter(s.chat("and then?", max_tokens=1))).token
        s.clear()
        assert s.append_history(history, [image])
        # the same text (here with the answer's end-of-turn marker, which the next turn adds otherwise)
        assert s.messages == history and s.history.text.startswith(text) and s.n_cells >= cells
        # the answer's tokens were decoded one by one the first time and as one batch here: the same first
        # token (greedy), not necessarily bit-identical logits
        assert next(iter(s.chat("and then?", max_tokens=1))).token == first
        assert len(s.messages) == len(history) + 2
        s.close()
