"""Task `second` and `--recall` of `edgekv eval` (issue 20): two facts in one document, the second asked as a
follow-up turn after the first answer; the recall setting recorded per record. Real Gemma 3 270M."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import THREADS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_video_needle.py"


class CharTokenizer:
    bos_id = 1

    def encode(self, text):
        return [ord(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i >= 2)


def test_second_samples_hold_both_facts_at_their_depths():
    from edgekv.eval.second import FORMATS
    from edgekv.eval.tasks import TaskSpec, build_samples

    tok = CharTokenizer()
    spec = TaskSpec(tasks=("second", "passkey"), lengths=(4096,), depths=(0.1, 0.5, 0.9), samples=4)
    samples = build_samples(tok, spec)
    second = [s for s in samples if s.task == "second"]
    assert len(second) == 12
    pairs = set()
    for s in second:
        m = s.meta
        doc = tok.decode(s.context)
        q1, q2 = tok.decode(s.question), tok.decode(s.followup)
        assert s.n_prompt == 4096 and s.followup and q1 != q2
        assert m["format"] != m["first_format"] and {m["format"], m["first_format"]} <= set(FORMATS)
        pairs.add((m["first_format"], m["format"]))
        # both facts are in the document, each where the meta says, the scored one near the sample's depth
        first = tok.decode(s.context[m["first_at"]: m["first_at"] + m["first_len"]])
        scored = tok.decode(s.context[m["needle_at"]: m["needle_at"] + m["needle_len"]])
        assert m["first_answer"] in first and s.answer in scored and s.answer not in first
        assert doc.count(s.answer) == (2 if m["format"] != "kv" else 1)   # "... is: X. Remember it. X is ..."
        # at the paragraph boundary nearest each depth (one character a token here: coarse boundaries)
        assert abs(m["needle_at"] / len(s.context) - s.depth) < 0.3
        assert abs(m["first_at"] / len(s.context) - m["first_depth"]) < 0.3
        assert (m["first_at"] < m["needle_at"]) == (m["first_depth"] < s.depth)
        # each question asks for its own fact
        for q, fmt, fact in ((q1, m["first_format"], first), (q2, m["format"], scored)):
            if fmt == "kv":
                key = q.split('"')[1]
                assert f'key "{key}"' in fact
            else:
                assert ("pass key" if fmt == "passkey" else "secret word") in q and \
                       ("pass key" if fmt == "passkey" else "secret word") in fact
    assert len(pairs) >= 4                                    # the format pairs vary across samples
    # the follow-up is part of the digest; the other tasks' digests are what they were before the field
    s = second[0]
    assert s.digest != type(s)(**{**s.__dict__, "followup": s.followup[:-1]}).digest
    p = next(x for x in samples if x.task == "passkey")
    h = hashlib.sha1()
    for part in (p.prefix, p.context, p.question, p.target):
        h.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    h.update(p.answer.encode())
    assert p.digest == h.hexdigest()[:12]


def test_recall_setting_checks_and_session_kwargs():
    from edgekv.errors import EdgeKVError
    from edgekv.eval.recall import check_recall, report_fields, session_kwargs
    from edgekv.eval.runner import GridConfig

    assert session_kwargs("off") == {}                        # today's Session accepts what off passes
    assert session_kwargs("disk", "/tmp/x") == {"recall": "disk", "recall_type": None, "recall_reprefill": "question",
                                                "recall_dir": "/tmp/x"}
    assert session_kwargs("ram-last")["recall_reprefill"] == "last"
    check_recall("off")
    assert session_kwargs("ram-g10")["recall_min_share"] == 0.1 and session_kwargs("disk-g0")["recall_min_share"] == 0
    check_recall("ram-x2-g20")
    for bad in ("swap", "ram-g100", "ram-gx", "off-last", "ram-fast"):
        with pytest.raises(EdgeKVError, match="--recall must be one of"):
            check_recall(bad)
    # an --out holds one recall setting: off keeps the identity of folders written before --recall
    assert "recall" not in GridConfig(methods=("snapkv",)).identity()
    assert GridConfig(methods=("snapkv",), recall="ram").identity()["recall"] == "ram"

    class R:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    assert report_fields([R(method="x")]) == {}
    assert report_fields([R(recalled=3, store_cells=10, store_bytes=100, reselect_s=0.1),
                          R(recalled=2, store_cells=8, store_bytes=80, reselect_s=0.25)]) == \
        {"recalled": 5, "store_cells": 8, "store_bytes": 80, "reselect_s": 0.35}
    # the largest head share of window attention any re-selection brought (or would bring) back
    assert report_fields([R(recalled=1, info={"recall_share": 0.3}), R(recalled=0, info={"recall_share": 0.05}),
                          R(recalled=0, info={})])["recall_share"] == 0.3


@pytest.mark.gemma
def test_second_question_is_a_followup_turn_after_the_first_answer(gemma_path):
    """The engine's two turns equal an independent one-shot prefill of document + first question, a
    hand-rolled greedy first answer, and the follow-up; without the first answer the logits differ."""
    from edgekv.eval.engine import RuntimeEngine
    from edgekv.eval.second import answer_second
    from edgekv.eval.tasks import TaskSpec, build_samples
    from edgekv.runtime import Session

    eng = RuntimeEngine(gemma_path, n_ctx=768, threads=THREADS)
    try:
        s = build_samples(eng.tokenizer, TaskSpec(tasks=("second",), lengths=(512,), depths=(0.2,), samples=1))[0]
        eng.prefill(s, 32)
        info = eng.compact("hybridkv", 0.25, 32)                # compacted: the turns sit after the kept cells
        rec = answer_second(eng, s, 8)
        assert eng.turns == [("user", len(s.question)), ("assistant", 8), ("user", len(s.followup)), ("assistant", 8)]
        assert eng.sess.n_cells == info.cells_after + 1 + 8 + len(s.followup) + 8
        assert rec["first_answer"] == s.meta["first_answer"] and "first_generated" in rec

        eng.compact("full", 1.0, 32)
        first = eng.generate(8)
        n_before = eng.sess.n_cells
        eng.ask(s.followup)
        assert eng.sess.n_cells == n_before + len(s.followup)   # the follow-up comes after the first answer
        got = eng.sess.logits.copy()
        second = eng.generate(8)
        eng.sess.close()
        eng.sess = None

        prompt = list(s.prefix) + list(s.context) + list(s.question)
        ref = Session(eng.model, method="full", budget=1.0, auto_compact=False)
        try:
            ref.append_tokens(prompt)
            answer = []
            for _ in range(8):                                   # greedy by hand
                tok = int(np.argmax(ref.logits))
                answer.append(tok)
                ref.append_tokens([tok], capture=False)
            assert eng.model.detokenize(answer) == first
            ref.append_tokens(list(s.followup))
            want = ref.logits.copy()
            ref.clear()
            ref.append_tokens(prompt + list(s.followup))         # the follow-up without the first answer
            without = ref.logits.copy()
        finally:
            ref.close()
        close = np.abs(got - want).max()
        assert int(np.argmax(got)) == int(np.argmax(want))
        assert close < 0.05 * np.abs(want).max()
        assert np.abs(got - without).max() > 5 * close
        assert s.answer in second
    finally:
        eng.close()


def _fresh_vs_reused(eng, s) -> tuple[list, list]:
    """Each run (compact + both turns) with the reused session, then with a fresh Session per run."""
    from edgekv.eval.second import answer_second

    eng.prefill(s, 32)
    runs = [("hybridkv", 0.25), ("hybridkv@before", 0.1), ("full", 1.0)]

    def each():
        out = []
        for m, b in runs:
            info = eng.compact(m, b, 32)
            rec = answer_second(eng, s, 8)
            out.append((info.cells_after, rec, eng.sess.state_blob(), id(eng.sess), eng.sess.method_name))
        return out

    reused = each()
    eng.fresh_sessions = True
    fresh = each()
    for a, b in zip(reused, fresh):
        assert a[:3] == b[:3]                                    # cells, answers and the cache's bytes
    assert len({x[3] for x in reused}) == 1                      # reused: one session
    assert [x[4] for x in fresh] == ["hybridkv", "hybridkv", "full"]   # fresh: the run's own method
    return reused, fresh


@pytest.mark.gemma
def test_a_fresh_session_per_run_restores_like_the_reused_one(gemma_path):
    """The path every recall run takes (a new Session per compressed run, the prefill's snapshot restored
    into it), checked with recall off against the reused session: the same answers and caches."""
    from edgekv.eval.engine import RuntimeEngine
    from edgekv.eval.tasks import TaskSpec, build_samples

    eng = RuntimeEngine(gemma_path, n_ctx=768, threads=THREADS)
    try:
        s = build_samples(eng.tokenizer, TaskSpec(tasks=("second",), lengths=(512,), depths=(0.8,), samples=1))[0]
        reused, _ = _fresh_vs_reused(eng, s)
        assert reused[2][1]["score"] == 1.0                      # the full cache answers the follow-up
    finally:
        eng.close()


def test_a_fresh_session_per_run_restores_media_cells(tiny_pairs):
    """The same on the media path (the document as images, tiny llava pair): image cells restored into a
    new Session compact and answer as in the reused one."""
    from edgekv.eval.engine import RuntimeEngine
    from edgekv.eval.tasks import TaskSpec, build_samples

    eng = RuntimeEngine(tiny_pairs["llava"][0], n_ctx=1024, threads=THREADS, media=True)
    try:
        s = build_samples(eng.tokenizer, TaskSpec(tasks=("second",), lengths=(384,), depths=(0.5,), samples=1))[0]
        reused, _ = _fresh_vs_reused(eng, s)
        assert eng.n_context % 256 == 0 and reused[0][0] < reused[2][0]   # image cells, compacted
    finally:
        eng.close()


@pytest.mark.gemma
def test_quick_second_eval_scores_full_and_records_recall(tmp_path, gemma_path):
    from edgekv.cli.main import cli

    out = tmp_path / "second"
    args = ["eval", "--quick", "--tasks", "second", "--regime", "both", "--out", str(out), "--no-plots",
            "--no-progress", "-m", str(gemma_path), "-t", str(THREADS)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert not [x for x in recs if "error" in x], recs
    assert len(recs) == 1 + 2 * 2                                # full + (streaming, snapkv) x (after, before)
    assert {x["recall"] for x in recs} == {"off"} and {x["task"] for x in recs} == {"second"}
    full = next(x for x in recs if x["method"] == "full")
    assert full["score"] == 1.0 and full["answer"] in full["generated"], full    # an easy sample, full cache
    assert full["first_score"] == 1.0 and full["first_answer"] != full["answer"]
    assert {x["regime"] for x in recs if x["method"] != "full"} == {"after", "before"}
    assert "## second: accuracy" in (out / "results.md").read_text()
    r = CliRunner().invoke(cli, args)                            # resumes: nothing to do
    assert r.exit_code == 0 and len((out / "records.jsonl").read_text().splitlines()) == len(recs)
    ram = tmp_path / "ram"
    args[args.index(str(out))] = str(ram)
    r = CliRunner().invoke(cli, args + ["--recall", "ram"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (ram / "records.jsonl").read_text().splitlines()]
    assert {x["recall"] for x in recs if x["method"] != "full"} == {"ram"}
    snap = [x for x in recs if x["method"] == "snapkv"]
    assert snap and all(x.get("store_cells", 0) > 0 for x in snap)     # the store got the compacted cells


@pytest.mark.gemma
def test_video_needle_records_its_recall_setting(tmp_path, gemma_path):
    spec = importlib.util.spec_from_file_location("bench_video_needle", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "vn"
    rc = bench.main(["--tasks", "passkey", "--lengths", "512", "--depths", "0.5", "--ratios", "0.2",
                     "--runs", "generic", "--threads", str(THREADS), "--model", str(gemma_path),
                     "--recall", "off", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "video-needle.json").read_text())
    assert data["config"]["recall"] == "off"
    assert [(r["run"], r["recall"]) for r in data["records"]] == [("full", "off"), ("generic", "off")]
    assert "recall off" in (out / "video-needle.md").read_text()


def test_second_summary_is_relative_to_full_on_the_same_samples():
    from edgekv.eval.second import markdown_table, summary_rows

    def rec(sample, method, budget, score, first):
        return {"task": "second", "sample": sample, "method": method, "budget": budget, "score": score,
                "first_score": first, "recall": "off"}

    recs = [rec("a", "full", 1.0, 1.0, 1.0), rec("b", "full", 1.0, 0.0, 1.0),
            rec("a", "hybridkv", 0.1, 1.0, 0.0), rec("b", "hybridkv", 0.1, 1.0, 1.0),
            {"task": "passkey", "sample": "c", "method": "full", "budget": 1.0, "score": 0.0}]
    rows = {(r["method"], r["budget"]): r for r in summary_rows(recs)}
    assert set(rows) == {("full", 1.0), ("hybridkv", 0.1)}
    h = rows[("hybridkv", 0.1)]
    assert h["second"] == 1.0 and h["second_relative"] == 2.0       # 2 hits where full had 1
    assert h["first"] == 0.5 and h["first_relative"] == 0.5
    assert "| hybridkv | 0.1 | off | 1.00 [0.34, 1.00] (2.00) | 0.50 [0.09, 0.91] (0.50) | 2 |" in markdown_table(recs)
