"""Probe windows (runtime/probe.py): the probe's cells are removed exactly, on a plain cache (tiny
llama) and on an iSWA cache (Gemma 3), and compaction before the question uses a probe by itself."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from conftest import THREADS
from edgekv.errors import EdgeKVError
from edgekv.methods import KVView, ScoreMethod


@dataclass
class KeepFirst(ScoreMethod):
    """Keeps the earliest candidates whatever the queries say: the same plan with and without a probe."""

    name = "keep-first"
    needs_queries = False

    def score(self, view: KVView) -> np.ndarray:
        return np.broadcast_to(-np.asarray(view.positions, np.float64),
                               (view.n_layers, view.n_kv_heads, view.n_tokens)).copy()


@dataclass
class KeepFirstQA(KeepFirst):
    name = "keep-first-qa"
    needs_queries = True


def spy_probes(monkeypatch) -> list[tuple]:
    """Record every probe a compaction decodes, as (the probe asked for, its tokens, known question?):
    a spy on the probe module's own tokenizing step, the real probe still runs."""
    from edgekv.runtime import probe as probes

    real, seen = probes.probe_tokens, []

    def spy(session, probe):
        toks, known = real(session, probe)
        seen.append((probe, list(toks), known))
        return toks, known

    monkeypatch.setattr(probes, "probe_tokens", spy)
    return seen


def test_question_probe():
    from edgekv.runtime.probe import question_probe

    assert question_probe("What is on the door?") == "What is on the door?"
    assert question_probe("") is True and question_probe(" \n") is True and question_probe(None) is True


def _prefill(model, doc, prefix):
    from edgekv.runtime import Session

    s = Session(model, window=8, auto_compact=False, early_compact=False)
    s.append_tokens(prefix)
    s.append_tokens(doc, compressible=True, capture=False)
    return s


def check_exact_removal(model, doc, prefix, probe, question):
    """With a probe then compaction == compaction alone, bit for bit (flash attention off)."""
    a = _prefill(model, doc, prefix)
    p0, n0 = a.cache.n_past, a.n_cells
    r = a.compact(method=KeepFirstQA(), budget=0.25, probe=probe)
    assert r is not None and r.probe == "question" and r.info["probe_tokens"] == len(probe)
    assert a.cache.n_past == p0 and a.n_cells < n0 and a.cache.window_rows == 0 and a.reports == [r]
    a.append_tokens(question, capture=False)
    got = (a.state_blob(), a.logits.copy(), a.cache.kind.copy())
    a.close()   # one live session per model
    b = _prefill(model, doc, prefix)
    b.compact(method=KeepFirst(), budget=0.25)
    b.append_tokens(question, capture=False)
    want = (b.state_blob(), b.logits.copy(), b.cache.kind.copy())
    b.close()
    same_blob = got[0] == want[0]  # a bool: pytest's diff of two multi-MB blobs would take minutes
    assert same_blob, "the cache after probe + removal differs from compaction alone"
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_probe_removal_is_exact_on_a_plain_cache(tiny_pairs):
    from edgekv.runtime import Model

    with Model.load(tiny_pairs["llava"][0], n_ctx=1024, threads=THREADS, flash_attn="off") as model:
        rng = np.random.default_rng(0)
        doc = rng.integers(262, 380, 300).tolist()
        check_exact_removal(model, doc, [1, 300, 301], rng.integers(262, 380, 12).tolist(),
                            rng.integers(262, 380, 6).tolist())


@pytest.mark.gemma
def test_probe_removal_is_exact_on_gemma_iswa(gemma_path, monkeypatch):
    """Gemma's sliding-window block: seq_rm alone is not exact after a compaction (control), restoring
    the SWA block from before the probe is."""
    from edgekv.eval.corpus import filler_paragraphs
    from edgekv.runtime import Model
    from edgekv.runtime import probe as probes

    real_remove = probes.remove_probe

    with Model.load(gemma_path, n_ctx=2048, threads=THREADS, flash_attn="off") as model:
        assert model.layout.iswa and model.layout.n_swa <= 512
        tok = lambda t: model.tokenize(t, add_bos=False, special=False)  # noqa: E731
        doc = tok(" ".join(filler_paragraphs()[:90]))[:1400]  # SWA cells (n_swa + n_ubatch) overflow
        prefix = [model.bos] + tok("Read this.\n\n")
        probe = tok("\n\nWhat is the pass key? The pass key is:")
        question = tok("\n\nWhat was the text about? It was about")
        check_exact_removal(model, doc, prefix, probe, question)

        # Control: the compaction writes the SWA block back with the probe's cells in it, and llama.cpp
        # prunes that block to the window behind the probe's last position: seq_rm cannot bring back
        # the cells the question needs. Without the saved SWA block the result must differ.
        monkeypatch.setattr(probes, "remove_probe", lambda s, p0, n, swa: real_remove(s, p0, n, None))
        with pytest.raises(AssertionError):
            check_exact_removal(model, doc, prefix, probe, question)


@pytest.fixture(scope="module")
def llava(tiny_pairs):
    from edgekv.runtime import Model

    model_path, mmproj, img = tiny_pairs["llava"]
    with Model.load(model_path, mmproj, n_ctx=512, threads=THREADS, flash_attn="off") as m:
        yield m, img


def test_compaction_before_the_question_uses_a_probe(llava):
    from edgekv.runtime import Session
    from edgekv.runtime.lib import mtmd_cpp

    model, img = llava
    marker = mtmd_cpp.mtmd_default_marker().decode()
    for method, auto in (("snapkv", False), ("auto", True)):
        s = Session(model, method=method, budget=0.25, auto_compact=False)
        s.append_prompt("a " + marker, [img])
        n_past, n_cells = s.cache.n_past, s.n_cells
        r = s.compact()
        assert r.auto == auto and r.probe == "generic" and r.resolved in ("snapkv", "hybridkv")
        assert r.info["probe_tokens"] > 0 and r.window == r.info["probe_tokens"]
        assert s.cache.n_past == n_past and s.n_cells == r.cells_after < n_cells
        s.append_text(" the")
        assert len(list(s.generate(max_tokens=2))) >= 1
        s.close()
    s = Session(model, method="snapkv", budget=0.25, auto_compact=False)
    s.append_prompt("a " + marker, [img])
    with pytest.raises(EdgeKVError, match="needs the question"):
        s.compact(probe=False)
    r = s.compact(probe="what is the cat?")
    assert r.probe == "question"
    s.close()


def test_early_compaction_probes_for_a_query_aware_method(llava):
    from edgekv.runtime import Session
    from edgekv.runtime.lib import mtmd_cpp

    model, img = llava
    marker = mtmd_cpp.mtmd_default_marker().decode()
    s = Session(model, method="snapkv", budget=0.25, auto_compact=False)
    s.append_prompt(f"a {marker}{marker} c", [img, img])  # no text between: no window
    assert s.reports and s.reports[0].early and s.reports[0].probe == "generic"
    assert s.n_cells <= model.n_ctx
    s.close()


def test_one_shot_chat_probes_early_compaction_with_its_question(tiny_pairs):
    """`edgekv chat -p`: the question is known before the tiles are read, so early compaction (the
    context holds 1024 of 2560 media tokens) uses it as the probe."""
    from click.testing import CliRunner

    from edgekv.cli.main import cli

    model, mmproj, image = tiny_pairs["llava-tiles"]
    r = CliRunner().invoke(cli, ["chat", "-m", str(model), "--mmproj", str(mmproj), "--image", str(image), "-p",
                                 "describe the cat", "--method", "snapkv", "--budget", "0.2", "-c", "1024", "-n", "2",
                                 "-t", str(THREADS)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "(early, before the question) (probe: question)" in r.output
