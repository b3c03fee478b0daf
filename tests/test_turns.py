"""Issue 17, items 2-4: a cancel belongs to one turn; history that a chat template renders differently
is cut back and prefilled again (compared with a fresh prefill of the same rendered text, not with
another chat() run); compressible tokens are never a question window; a blank probe is an error.
On the real llama.cpp: the tiny models, and the real Gemma 3 270M with llama.cpp's built-in templates."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from edgekv.errors import Cancelled, EdgeKVError, ModelLoadError, SessionError
from edgekv.runtime import Model, Session
from edgekv.runtime.cache import PACKED
from edgekv.runtime.turn import CancelToken

from conftest import THREADS


def load(pairs, variant="llava", n_ctx=4096, n_batch=2048, fa="off", **kw) -> Model:
    model, mmproj, _ = pairs[variant]
    return Model.load(model, mmproj, n_ctx=n_ctx, n_batch=n_batch, threads=THREADS, flash_attn=fa, **kw)


def abort_flag(m: Model) -> bool:
    """What llama.cpp's abort callback reads (Model.set_abort)."""
    return m.abort_flag.raw[:1] != b"\0"


# --- 3. cancel belongs to one turn ----------------------------------------------------------------------

def test_a_stop_before_the_turn_starts_cancels_that_turn(tiny_pairs):
    """A token cancelled before its turn starts (a server request stopped while queued): the turn raises
    Cancelled at once and leaves nothing behind; the next turn, with its own token, runs."""
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        list(s.chat("Hello.", max_tokens=3))
        blob, msgs = s.state_blob(), [dict(x) for x in s.messages]
        token = CancelToken()
        token.cancel()
        with pytest.raises(Cancelled):
            list(s.chat("Tell me more.", max_tokens=5, cancel=token))
        assert s.state_blob() == blob and s.messages == msgs
        assert not abort_flag(m)
        assert list(s.chat("Tell me more.", max_tokens=2))[-1].finish_reason in ("length", "stop")
        s.close()


def test_a_late_cancel_of_an_ended_turn_never_reaches_the_next(tiny_pairs):
    """Turn 1's token cancelled while turn 2 prefills (a Stop arriving late for the previous request):
    turn 2 is not touched. Session.cancel() with no turn running does nothing, and llama.cpp's abort flag
    is clear after every turn."""
    with load(tiny_pairs, n_batch=64) as m:
        s = Session(m, method="full")
        t1 = CancelToken()
        list(s.chat("Hello.", max_tokens=3, cancel=t1))
        assert not abort_flag(m)
        s.progress = lambda stage, done, total: t1.cancel()
        out = list(s.chat("word " * 100, max_tokens=3, cancel=CancelToken()))
        assert out[-1].finish_reason == "length" and out[-1].generation_tokens == 3
        s.progress = None
        s.cancel()   # no turn running: nothing to stop
        assert not abort_flag(m)
        assert list(s.chat("Again.", max_tokens=2))[-1].finish_reason in ("length", "stop")
        s.close()


def test_a_cancel_after_the_answer_does_not_break_a_later_probe_compaction(tiny_pairs):
    """The stale flag measured in the issue: cancel() after a turn whose answer was complete, then a
    probe-window compact() (a decode of its own) must run, and plan as a fresh session does."""
    _, _, image = tiny_pairs["llava"]
    with load(tiny_pairs) as m:
        s = Session(m, method="auto", budget=0.5)
        s.append_prompt("Look:\n" + "<__media__>", [image])
        s.cancel()                          # nothing running
        r = s.compact()
        assert r is not None and r.info.get("probe_tokens", 0) > 0
        got = s.state_blob()
        s.close()
        ref = Session(m, method="auto", budget=0.5)
        ref.append_prompt("Look:\n" + "<__media__>", [image])
        ref.compact()
        assert ref.state_blob() == got
        ref.close()


def test_cancel_with_its_token_during_the_answer_keeps_the_partial_answer(tiny_pairs):
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        token = CancelToken()
        out = []
        for r in s.chat("Tell me a long story.", max_tokens=100, cancel=token):
            out.append(r)
            if r.generation_tokens >= 2 and not token.cancelled:
                t = threading.Thread(target=token.cancel)
                t.start()
                t.join()
        assert out[-1].finish_reason == "cancelled" and out[-1].generation_tokens < 10
        assert s.messages[-1]["content"] == "".join(r.text for r in out)
        assert not abort_flag(m)
        s.close()


# --- 4. the question window and the probe ---------------------------------------------------------------

def test_compressible_tokens_are_never_the_question_window(tiny_pairs):
    """A document appended as compressible text captures no window, so compact() probes for one
    (generic probe) instead of protecting the document's own last tokens as 'the question'."""
    with load(tiny_pairs) as m:
        s = Session(m, method="auto", budget=0.25)
        doc = m.tokenize("The code is 4417. " + "Filler words go on and on. " * 40, add_bos=True)
        s.append_tokens(doc, compressible=True)
        assert s.cache.window_rows == 0
        n_doc = len(doc)
        r = s.compact()
        assert r.info["probe_tokens"] > 0 and r.info["probe_known"] is False
        assert r.n_candidates == n_doc - 1          # every document cell but pos_max, none protected as a window
        s.close()


@pytest.mark.parametrize("probe", ["", "   ", "\n\t"])
def test_a_blank_probe_is_a_clear_error(tiny_pairs, probe):
    _, _, image = tiny_pairs["llava"]
    with load(tiny_pairs) as m:
        with pytest.raises(EdgeKVError, match="probe text is blank"):
            Session(m, probe=probe)
        s = Session(m, method="hybridkv", budget=0.5)
        s.append_prompt("<__media__>", [image])
        blob = s.state_blob()
        with pytest.raises(EdgeKVError, match="probe text is blank"):
            s.compact(probe=probe)
        assert s.state_blob() == blob
        s.close()


# --- 2. history rendered differently ---------------------------------------------------------------------

def fresh_prefill(m: Model, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The independent reference: a new session prefilled with `text` in one go. (positions, keys of the
    compressible block sorted by position, logits)."""
    s = Session(m, method="full")
    s.append_text(text)
    out = cache_rows(s) + (s.logits.copy(),)
    s.close()
    return out


def cache_rows(s: Session) -> tuple[np.ndarray, np.ndarray]:
    from edgekv.kv.packer import layer_floats

    base = s.cache.parse(s.state_blob()).blocks[0]
    order = np.argsort(base.pos, kind="stable")
    K, _ = layer_floats(base, s.model.layout.n_head_kv, values=False)
    return base.pos[order].copy(), K[:, :, order]


def assert_same_rows(keys: np.ndarray, ref: np.ndarray, min_cos: float) -> None:
    """Each cached key row is the fresh prefill's row of the same position: cosine at least min_cos.
    (Not bitwise: llama.cpp's quantized matmuls round differently for other batch splits; a row of
    another token is far off: measured on Gemma, no row shifted by one position reaches 0.99.)"""
    a, b = keys.reshape(-1, keys.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    assert cos.min() >= min_cos, f"worst row cosine {cos.min():.4f}"


def assert_cache_is_a_fresh_prefill(s: Session, m: Model, n_answer: int, min_cos: float) -> None:
    """The cache after the last turn's prompt (+ its n_answer answer cells) holds what a fresh prefill of
    the rendered conversation holds: as many cells, the same positions, the same key rows. Closes s."""
    rendered = s.format_chat(s.messages[:-1], add_assistant=True)
    pos, keys = cache_rows(s)
    n_cells = s.n_cells
    s.close()
    ref_pos, ref_keys, _ = fresh_prefill(m, rendered)
    n = len(ref_pos)
    assert n_cells == n + n_answer          # the prompt as a fresh prefill has it, then the answer
    np.testing.assert_array_equal(pos[:n], ref_pos)
    assert_same_rows(keys[:, :, :n], ref_keys, min_cos)


def test_edited_text_history_starts_over_and_matches_a_fresh_prefill(tiny_pairs):
    """The first user message changed (an app edited the history): no cached prefill point lies before
    the difference, the conversation is text only, so it is prefilled again from the start."""
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        list(s.chat("My name is Ada.", max_tokens=3))
        s.messages[0]["content"] = "My name is Bob."
        n_answer = list(s.chat("What is my name?", max_tokens=1))[-1].generation_tokens
        assert_cache_is_a_fresh_prefill(s, m, n_answer, min_cos=0.9999)


def test_a_failed_turn_after_a_cut_puts_the_cut_cells_back(tiny_pairs):
    """The cut is part of the turn: when the turn then fails, the cells it removed are back, byte for byte."""
    with load(tiny_pairs) as m:
        s = Session(m, method="full")
        list(s.chat("My name is Ada.", max_tokens=3))
        s.messages[0]["content"] = "My name is Bob."
        blob, msgs = s.state_blob(), [dict(x) for x in s.messages]

        def boom(stage, done, total):
            raise RuntimeError("boom")

        s.progress = boom
        with pytest.raises(RuntimeError, match="boom"):
            list(s.chat("What is my name?", max_tokens=1))
        assert s.state_blob() == blob and s.messages == msgs


def test_edited_history_behind_a_compacted_image_is_refused_and_nothing_changes(tiny_pairs):
    _, _, image = tiny_pairs["llava"]
    with load(tiny_pairs) as m:
        s = Session(m, method="knorm", budget=0.5)
        list(s.chat("Describe it.", [image], max_tokens=3))
        assert (s.cache.kind == PACKED).any()
        s.messages[0]["content"] = s.messages[0]["content"].replace("Describe", "Explain")
        blob, msgs = s.state_blob(), [dict(x) for x in s.messages]
        with pytest.raises(SessionError, match="start a new conversation"):
            list(s.chat("And the colours?", max_tokens=2))
        assert s.state_blob() == blob and s.messages == msgs
        s.close()


@pytest.mark.gemma
@pytest.mark.parametrize("name", ["gemma", "llama3"])
def test_real_template_that_trims_history_gives_the_fresh_prefill_cache(gemma_path, name):
    """llama.cpp's gemma and llama3 templates trim every message, so turn 2's render differs from the
    cached turn-1 answer where the answer ends (or starts) with white space. The cache after turn 2's
    prompt must hold exactly a fresh prefill of turn 2's rendered text: same cells, positions and keys
    (before the fix, the answer was in the cache twice)."""
    with Model.load(gemma_path, n_ctx=1024, n_batch=256, threads=THREADS, flash_attn="off",
                    chat_template=name) as m:
        s = Session(m, method="full")
        answer1 = ""
        for r in s.chat("List three colours, one per line.", max_tokens=40):
            answer1 += r.text
            if answer1.endswith("\n"):
                break       # Stop pressed after a line: the kept answer ends with a new line
        assert answer1 != answer1.strip()
        cached = s.history.text
        n_answer = list(s.chat("Now one line about the wind.", max_tokens=1))[-1].generation_tokens
        assert not s.format_chat(s.messages[:-1]).startswith(cached), "the template was to re-render the answer"
        assert_cache_is_a_fresh_prefill(s, m, n_answer, min_cos=0.99)


@pytest.mark.gemma
def test_gemma_template_by_name_answers_as_llama_cpp_does(gemma_path):
    """The Gemma GGUF has no template: without --chat-template it is ChatML (said once on stderr); with
    `gemma`, edgekv's greedy answer equals llama-cpp-python's own completion of the same rendered text."""
    from llama_cpp import Llama

    with pytest.raises(ModelLoadError, match="unknown chat template 'gemmma'"):
        Model.load(gemma_path, n_ctx=256, threads=THREADS, chat_template="gemmma")
    with Model.load(gemma_path, n_ctx=512, threads=THREADS, flash_attn="off") as m:
        assert m.template_fallback() == "the model has no chat template"
    with Model.load(gemma_path, n_ctx=512, threads=THREADS, flash_attn="off", chat_template="gemma") as m:
        assert m.template_fallback() is None
        s = Session(m, method="full")
        prompt = s.format_chat([{"role": "user", "content": "What is the capital of France?"}])
        assert prompt.startswith("<start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
        got = "".join(r.text for r in s.chat("What is the capital of France?", max_tokens=8))
        s.close()
    llm = Llama(str(gemma_path), n_ctx=512, n_threads=THREADS, verbose=False, flash_attn=False)
    want = llm(prompt, max_tokens=8, temperature=0.0, top_k=1)["choices"][0]["text"]
    assert got == want


# --- the ledger (issue 19): every parse checks where the cells are ----------------------------------------

def test_a_cell_out_of_the_ledgers_order_is_a_clear_error(tiny_pairs):
    """Two text cells swapped in llama.cpp's cache behind the session's back (what a desync between blob
    order and bookkeeping would look like): the next read of the cache says so instead of planning on
    the wrong cells."""
    from edgekv.errors import StateFormatError
    from edgekv.kv.codec import SeqState, serialize_state

    _, _, image = tiny_pairs["llava"]
    with load(tiny_pairs) as m:
        s = Session(m, method="knorm", budget=0.5, auto_compact=False)
        s.append_prompt("Look at this: <__media__>\nand describe it please.", [image])
        s.compact()
        st = s.cache.parse(s.state_blob())
        order = np.arange(st.blocks[0].n_cells)
        order[[2, 3]] = order[[3, 2]]
        swapped = serialize_state(SeqState(st.seq_id, [st.blocks[0].take(order)] + st.blocks[1:], st.has_ext))
        assert s.cache.set_state(swapped)
        with pytest.raises(StateFormatError, match="out of the ledger's order: cell 2 holds position 3"):
            s.kv_bytes()
        s.close()


# --- --chat-template on the command line ---------------------------------------------------------------------

@pytest.mark.gemma
def test_chat_template_option_on_the_cli(gemma_path):
    """`edgekv info` says when prompts fall back to ChatML, `chat` warns once on stderr, a built-in name
    replaces the fallback, and an unknown name is one Error line with exit code 2 before anything loads."""
    from click.testing import CliRunner

    from edgekv.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["info", str(gemma_path)])
    assert r.exit_code == 0 and "ChatML fallback: the model has no chat template" in r.output
    r = runner.invoke(cli, ["info", str(gemma_path), "--chat-template", "gemma"])
    assert r.exit_code == 0 and "gemma (--chat-template)" in r.output
    r = runner.invoke(cli, ["chat", "-m", str(gemma_path), "--chat-template", "gemmaa", "-p", "hi"])
    assert r.exit_code == 2 and "Error: Invalid value for '--chat-template': unknown chat template 'gemmaa'" in r.output
    args = ["chat", "-m", str(gemma_path), "-t", str(THREADS), "-c", "512", "-n", "3", "--no-report", "-p", "Hi."]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0 and r.stderr.count("formatting prompts as ChatML") == 1
    r = runner.invoke(cli, args + ["--chat-template", "gemma"])
    assert r.exit_code == 0 and "ChatML" not in r.stderr
