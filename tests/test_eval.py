"""The eval harness without a model: corpus, tasks, scoring, the resumable runner, reports, CLI parsing."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from edgekv.errors import BudgetError, EdgeKVError
from edgekv.eval import corpus, scoring
from edgekv.eval.engine import CompactInfo, Engine
from edgekv.eval.report import aggregate, markdown, write_reports
from edgekv.eval.runner import RECORDS, GridConfig, load_records, plan_runs, run_grid
from edgekv.eval.tasks import TaskSpec, build_samples


class CharTokenizer:
    """One token per character (ids offset past BOS=1)."""

    bos_id = 1

    def encode(self, text):
        return [ord(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i >= 2)


V = 1 << 16  # covers every character id of the corpus


class FakeEngine(Engine):
    """Keeps a deterministic subset of the context per (method, budget); 'answers' a retrieval sample
    right when the needle survived, and perturbs logits in proportion to what was dropped."""

    name = "fake"

    def __init__(self, fail_method=None):
        self.tokenizer = CharTokenizer()
        self.prefills = 0
        self.compactions = []
        self.fail_method = fail_method

    def prefill(self, sample, window=32):
        self.sample, self.prefills = sample, self.prefills + 1
        return 0.5

    def compact(self, method, budget, window):
        if method == self.fail_method:
            raise ValueError("boom")
        self.compactions.append((self.sample.key, method, budget))
        n = len(self.sample.context)
        if method == "full":
            self.kept = np.ones(n, bool)
        elif method == "recent":
            self.kept = np.arange(n) >= n - int(budget * n)
        else:
            rng = np.random.default_rng(zlib.crc32(f"{self.sample.key}{method}{budget}".encode()))
            self.kept = np.zeros(n, bool)
            self.kept[rng.choice(n, int(budget * n), replace=False)] = True
        after = len(self.sample.prefix) + int(self.kept.sum()) + len(self.sample.question)
        return CompactInfo(self.sample.n_prompt, after, 100 * self.sample.n_prompt, 100 * after, 0.01)

    def generate(self, max_tokens):
        m = self.sample.meta
        if self.kept[m["needle_at"]: m["needle_at"] + m["needle_len"]].all():
            return f" {self.sample.answer}. Remember"
        return " 12345."

    def eval_logits(self, ids):
        logits = np.zeros((len(ids), V))
        logits[np.arange(len(ids)), np.asarray(ids) % V] = 5.0
        noise = np.random.default_rng(len(ids)).standard_normal(logits.shape)
        return logits + 4.0 * (1.0 - self.kept.mean()) * noise


SPEC = TaskSpec(lengths=(600, 1200), depths=(0.2, 0.8), samples=1, continuation_samples=1, target_tokens=8)


def test_corpus_is_real_offline_text():
    paras = corpus.filler_paragraphs()
    assert len(paras) > 500 and sum(map(len, paras)) > 100_000
    assert any("assert" in p for p in paras[:5])          # the Language Reference, as CPython ships it
    docs = corpus.continuation_documents()
    kinds = {d.kind for d in docs}
    assert {"docs", "code", "license"} <= kinds
    assert all(len(d.text) > 5000 for d in docs)
    assert not any(p.startswith(("****", "====", "----")) for p in paras)   # rst heading rules stripped


def test_samples_have_exact_lengths_and_needles_at_depth():
    tok = CharTokenizer()
    samples = build_samples(tok, SPEC)
    assert [s.key for s in samples] == [s.key for s in build_samples(tok, SPEC)]   # deterministic
    assert {s.task for s in samples} == {"passkey", "kv", "continuation"}
    for s in samples:
        assert s.n_prompt == s.length, s.key
        assert s.prefix[0] == tok.bos_id
        if s.task == "continuation":
            whole = tok.decode(s.prefix + s.context + s.question + s.target)
            doc = next(d for d in corpus.continuation_documents() if d.name == s.source)
            assert whole in doc.text                       # context and target are contiguous real text
            assert len(s.target) == SPEC.target_tokens
            continue
        ctx = tok.decode(s.context)
        assert s.answer in ctx and s.answer in tok.decode(s.context[s.meta["needle_at"]:])
        frac = s.meta["needle_at"] / len(s.context)
        assert abs(frac - s.depth) < 0.3, (s.key, frac)
        assert s.answer not in tok.decode(s.question)      # the question asks, it does not tell
    kv = [s for s in samples if s.task == "kv"]
    assert all(s.meta["n_pairs"] >= 4 for s in kv)
    assert tok.decode(kv[0].question).endswith('is "')


def test_scoring():
    assert scoring.retrieval_hit(" 71432. Remember", "71432")
    assert not scoring.retrieval_hit(" 714321", "71432")
    assert not scoring.retrieval_hit(" 7143", "71432")
    a = np.random.default_rng(0).standard_normal((5, 40))
    assert np.allclose(scoring.kl_divergence(a, a), 0)
    assert (scoring.kl_divergence(a, a + np.random.default_rng(1).standard_normal(a.shape)) > 0).all()
    s = scoring.continuation_scores(a, a, np.argmax(a, -1))
    assert s["top1"] == 1.0 and s["score"] == 1.0 and s["target_acc"] == 1.0 and s["kl"] < 1e-9


def _cfg(**kw):
    return GridConfig(methods=("recent", "rand", "full"), budgets=(0.5, 0.1), spec=SPEC, model="fake.gguf", **kw)


def test_grid_records_every_run_and_resumes(tmp_path):
    eng = FakeEngine()
    cfg = _cfg()
    samples = build_samples(eng.tokenizer, SPEC)
    recs = run_grid(eng, cfg, tmp_path, samples=samples, progress=False)
    runs = plan_runs(cfg)
    assert runs[0] == ("full", 1.0) and ("full", 0.5) not in runs
    assert len(recs) == len(samples) * len(runs) == eng.prefills * len(runs)
    by = {r["key"]: r for r in recs}
    for s in samples:
        full = by[f"{s.key}|full|1"]
        assert full["score"] == 1.0
        if s.task == "continuation":
            assert full["kl"] < 1e-12 and full["top1"] == 1.0
            assert by[f"{s.key}|rand|0.1"]["kl"] > 0

    # a second run does nothing
    eng2 = FakeEngine()
    run_grid(eng2, cfg, tmp_path, samples=samples, progress=False)
    assert eng2.prefills == 0 and eng2.compactions == []

    # an interrupted run (last records lost, a line cut mid-write) redoes only what is missing
    lines = (tmp_path / RECORDS).read_text().splitlines()
    (tmp_path / RECORDS).write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:20])
    eng3 = FakeEngine()
    recs3 = run_grid(eng3, cfg, tmp_path, samples=samples, progress=False)
    assert len(recs3) == len(recs)
    assert eng3.prefills == 1
    redone = {(k, m, b) for k, m, b in eng3.compactions if m != "full"}
    assert len(redone) <= 4 and all(k == samples[-1].key for k, _, _ in redone)

    # the same folder with other sample-defining settings is refused
    with pytest.raises(EdgeKVError, match="other settings"):
        run_grid(FakeEngine(), _cfg(max_new_tokens=3), tmp_path, samples=samples, progress=False)


def test_a_failing_method_is_recorded_and_retried(tmp_path):
    samples = build_samples(CharTokenizer(), TaskSpec(tasks=("passkey",), lengths=(600,), depths=(0.5,)))
    errors = []
    run_grid(FakeEngine(fail_method="rand"), _cfg(), tmp_path, samples=samples, progress=False, log=errors.append)
    recs = load_records(tmp_path)
    assert {r["method"] for r in recs} == {"full", "recent"}
    assert len(errors) == 2 and "boom" in errors[0]
    md = write_reports(tmp_path, plots=False)["md"].read_text()
    assert "## Errors" in md and "rand" in md
    run_grid(FakeEngine(), _cfg(), tmp_path, samples=samples, progress=False)   # fixed: retried
    assert {r["method"] for r in load_records(tmp_path)} == {"full", "recent", "rand"}
    assert "## Errors" not in write_reports(tmp_path, plots=False)["md"].read_text()


def test_reports_tables_and_plots(tmp_path):
    eng = FakeEngine()
    run_grid(eng, _cfg(), tmp_path, progress=False, samples=build_samples(eng.tokenizer, SPEC))
    paths = write_reports(tmp_path, plots=True)
    for key in ("csv", "json", "md", "plot_scores", "plot_kl"):
        assert Path(paths[key]).stat().st_size > 100, key
    assert Path(paths["plot_scores"]).read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(load_records(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["identity"]["model"] == "fake.gguf"
    agg = aggregate(load_records(tmp_path))
    full = [r for r in agg if r["method"] == "full" and r["length"] == "all"]
    assert all(r["relative"] == 1.0 for r in full if r["task"] != "continuation")
    recent = next(r for r in agg if r["method"] == "recent" and r["task"] == "passkey" and r["length"] == "all"
                  and r["budget"] == 0.5)
    assert recent["score"] == 0.5 and recent["relative"] == 0.5   # keeps the needle at depth 0.8 only
    md = markdown(load_records(tmp_path))
    assert "| recent | 0.50 [0.15, 0.85] (0.50) n=4 |" in md   # n and the 95 % Wilson interval
    assert "## Full-cache baseline" in md and "compact % of prefill" in md


def test_cli_option_parsing():
    from edgekv.cli.eval_cmd import parse_budgets, parse_lengths, parse_methods

    assert parse_lengths("1k,2k, 4096") == (1024, 2048, 4096)
    assert parse_lengths(None) is None
    assert parse_budgets("0.25,0.5,0.25") == (0.5, 0.25)
    assert parse_methods("snapkv,streaming") == ("snapkv", "streaming")
    assert "full" not in parse_methods("all")
    with pytest.raises(EdgeKVError, match="unknown method"):
        parse_methods("snapkv,nope")
    with pytest.raises(BudgetError):
        parse_budgets("512")
    with pytest.raises(EdgeKVError, match="too short"):
        parse_lengths("64")


def test_cli_errors_are_one_line(tmp_path):
    from click.testing import CliRunner

    from edgekv.cli.main import cli

    r = CliRunner().invoke(cli, ["eval", "--methods", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown method" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["eval", "--report-only", "--out", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no records" in r.output


def test_a_changed_sample_is_redone(tmp_path):
    tok = CharTokenizer()
    spec = TaskSpec(tasks=("passkey",), lengths=(600,), depths=(0.5,))
    samples = build_samples(tok, spec)
    run_grid(FakeEngine(), _cfg(), tmp_path, samples=samples, progress=False)
    import dataclasses

    changed = [dataclasses.replace(samples[0], answer="99999")]   # same key, other content
    eng = FakeEngine()
    run_grid(eng, _cfg(), tmp_path, samples=changed, progress=False)
    assert eng.prefills == 1
    assert all(r["sample_digest"] == changed[0].digest for r in load_records(tmp_path))
