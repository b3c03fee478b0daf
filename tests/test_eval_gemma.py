"""`edgekv eval --quick` for real on Gemma 3 270M, and the engine's prefill-once / restore mechanics."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import THREADS

pytestmark = pytest.mark.gemma


def test_quick_eval_runs_scores_and_resumes(tmp_path, gemma_path):
    from edgekv.cli.main import cli

    out = tmp_path / "quick"
    args = ["eval", "--quick", "--out", str(out), "--no-plots", "--no-progress", "-m", str(gemma_path),
            "-t", str(THREADS)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    recs = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert not [x for x in recs if "error" in x]
    assert len(recs) == 3 * 3                                  # 3 samples x (full + 2 methods x 1 budget)
    full = {x["task"]: x for x in recs if x["method"] == "full"}
    assert full["passkey"]["score"] == 1.0, full["passkey"]   # the base model retrieves with the full cache
    assert full["kv"]["score"] == 1.0, full["kv"]
    assert full["continuation"]["kl"] == 0.0 and full["continuation"]["top1"] == 1.0
    for x in recs:
        if x["method"] != "full":
            assert x["cells_after"] < x["cells_before"] and x["bytes_after"] < x["bytes_before"]
            assert 0 <= x["score"] <= 1
    for name in ("results.csv", "summary.json", "results.md", "config.json"):
        assert (out / name).exists()
    assert "## Full-cache baseline" in (out / "results.md").read_text()

    r = CliRunner().invoke(cli, args)                           # resume: nothing left to run
    assert r.exit_code == 0, r.output
    assert len((out / "records.jsonl").read_text().splitlines()) == len(recs)


def test_engine_restores_the_prefill_exactly(gemma_path):
    from edgekv.eval.engine import RuntimeEngine
    from edgekv.eval.tasks import TaskSpec, build_samples
    from edgekv.runtime import Session

    eng = RuntimeEngine(gemma_path, n_ctx=512, threads=THREADS)
    try:
        spec = TaskSpec(tasks=("continuation",), lengths=(256,), continuation_samples=1, target_tokens=6)
        s = build_samples(eng.tokenizer, spec)[0]
        eng.prefill(s, 32)
        info = eng.compact("snapkv", 0.25, 32)
        a = eng.eval_logits(s.target)
        eng.compact("streaming", 0.1, 32)
        eng.eval_logits(s.target)
        eng.compact("snapkv", 0.25, 32)
        b = eng.eval_logits(s.target)
        assert info.cells_after < info.cells_before
        assert np.array_equal(a, b)                             # restore + compact is deterministic
        eng.compact("full", 1.0, 32)
        ref = eng.eval_logits(s.target)
        assert not np.array_equal(a, ref)

        # the same as a fresh session that compacts once (one live session per model: the engine's goes)
        eng.sess.close()
        eng.sess = None
        sess = Session(eng.model, method="snapkv", budget=0.25, window=32, auto_compact=False)
        sess.append_tokens(list(s.prefix))
        sess.append_tokens(list(s.context), compressible=True)
        sess.append_tokens(list(s.question[:-1]))
        sess.compact()
        sess.append_tokens(list(s.question[-1:]), capture=False)
        direct = np.concatenate([sess.logits[None], sess.eval_logits(list(s.target[:-1]))])
        sess.close()
        assert np.array_equal(a, direct)
    finally:
        eng.close()
