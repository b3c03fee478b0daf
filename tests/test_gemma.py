"""On the real Gemma 3 270M (iSWA: 3 global + 15 sliding-window layers, 1 KV head, head dim 256)."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekv.kv.codec import parse_state, serialize_state
from edgekv.runtime import Model, Session

from conftest import THREADS, window_softmax

pytestmark = pytest.mark.gemma

NEEDLE = "The secret pass key is 71432. Remember it."
QUESTION = "\nQuestion: what is the secret pass key?\nAnswer: The secret pass key is"


def haystack(n_chars: int = 2400) -> str:
    """Real text that ships offline (the stdlib's own source), with the needle in the middle."""
    text = Path(inspect.getsourcefile(inspect)).read_text()[:n_chars]
    half = len(text) // 2
    return text[:half] + "\n" + NEEDLE + "\n" + text[half:]


@pytest.fixture(scope="module")
def gemma(gemma_path):
    with Model.load(gemma_path, n_ctx=2048, n_batch=512, threads=THREADS, flash_attn="off") as m:
        yield m


def test_iswa_state_round_trip(gemma):
    s = Session(gemma, method="full", auto_compact=False)
    s.append_text(haystack(1200))
    blob = s.state_blob()
    state = parse_state(blob, n_blocks=2)
    assert [b.n_layers for b in state.blocks] == [3, 15]     # global block, then sliding-window block
    assert state.blocks[0].n_cells == s.n_cells
    assert state.blocks[1].n_cells <= max(gemma.layout.n_swa, s.n_cells)
    assert serialize_state(state) == blob
    s.close()


def test_full_budget_round_trip_gives_identical_logits(gemma):
    probe = gemma.tokenize(" the quick brown fox jumps over the lazy dog", special=False)
    ref = Session(gemma, method="full", auto_compact=False)
    ref.append_text(haystack(), compressible=True)
    ref.append_text(QUESTION)
    want = ref.eval_logits(probe)
    ref.close()

    s = Session(gemma, method="full", budget=1.0, auto_compact=False)
    s.append_text(haystack(), compressible=True)
    s.append_text(QUESTION)
    r = s.compact()                                          # re-packs and writes every cell back
    assert r is not None and r.cells_after == r.cells_before
    np.testing.assert_array_equal(s.eval_logits(probe), want)
    s.close()


def answer(session: Session) -> str:
    return "".join(r.text for r in session.generate(max_tokens=6))


def test_snapkv_half_budget_keeps_the_needle(gemma):
    full = Session(gemma, method="full", auto_compact=False)
    full.append_text(haystack(), compressible=True)
    full.append_text(QUESTION)
    assert "71432" in answer(full)                          # the model itself solves it
    full.close()

    s = Session(gemma, method="snapkv", budget=0.5)
    s.append_text(haystack(), compressible=True)
    s.append_text(QUESTION)
    r = s.compact()
    assert r.cells_after < 0.6 * r.cells_before
    assert "71432" in answer(s)
    s.close()


def test_every_method_through_chat(gemma_path):
    """`edgekv chat` on Gemma (text-only: --compress all) with every method; each must answer and cut."""
    from edgekv.cli.main import cli
    from edgekv.methods import METHODS

    prompt = haystack(1600) + QUESTION
    for name in sorted(METHODS):
        r = CliRunner().invoke(cli, ["chat", "-m", str(gemma_path), "-p", prompt, "--method", name,
                                     "--budget", "0.25", "--compress", "all", "-n", "4", "-t", str(THREADS),
                                     "-c", "2048", "-fa", "off"], catch_exceptions=False)
        assert r.exit_code == 0, (name, r.output)
        m = re.search(r"KV cells\s+(\d+) -> (\d+)", r.output)
        assert m, (name, r.output)
        before, after = int(m.group(1)), int(m.group(2))
        if name != "full":
            # pyramid schedules give the first layer ~2x the budget, and cells = the largest budget
            assert after < 0.75 * before, (name, r.output)


def test_captured_queries_match_llama_softmax_on_global_layers(gemma):
    """Gemma scales Q after the RoPE node and has 4 query heads on 1 KV head: the captured window,
    with the scale from the hyper-parameters, reproduces kq_soft_max of the 3 global layers."""
    from edgekv.kv.packer import layer_floats

    s = Session(gemma, method="snapkv", auto_compact=False, window=8)
    cap = gemma.capture
    cap.extra_prefixes, cap.extra = (b"kq_soft_max",), {}
    s.append_text(haystack(1200), compressible=True)
    s.append_text(QUESTION)
    cap.extra_prefixes = ()
    lay = gemma.layout
    K, _ = layer_floats(parse_state(s.state_blob(), n_blocks=2).blocks[0], lay.n_head_kv)
    Q = s.cache.window_q
    T = K.shape[2]
    for j, il in enumerate(lay.global_layers):
        ref = cap.extra[f"kq_soft_max-{il}"][..., :T]
        p = window_softmax(Q[j], K[j], lay.attn_scale)
        np.testing.assert_allclose(p, ref, atol=2e-3)
        assert (p.argmax(-1) == ref.argmax(-1)).all()
    s.close()
