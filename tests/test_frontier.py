"""The memory-axis report on hand-built records: every (method, budget, cache type) a point, paired with the
f16 full cache of the same samples; the front is monotone and is the best at or under each size."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from edgekv.cli.main import cli
from edgekv.eval import frontier
from edgekv.eval.runner import RECORDS

FULL_BYTES = 1000


def rec(sample: str, method: str, budget: float, ct: str | None, kv: int, score: float, task: str = "passkey",
        regime: str = "after") -> dict:
    r = {"key": f"{sample}|{method}|{budget:g}" + (f"|{ct}" if ct and ct != "f16" else ""), "sample": sample,
         "task": task, "length": 1024, "depth": 0.5, "index": 0, "method": method, "budget": budget,
         "score": score, "kv_bytes": kv, "kv_bytes_full_f16": FULL_BYTES, "regime": regime}
    if ct is not None:      # None: a record written before cache types (f16)
        r["cache_type"] = ct
    return r


def records() -> list[dict]:
    out = []
    for i, s in enumerate(("a", "b", "c", "d")):
        out += [rec(s, "full", 1.0, None, FULL_BYTES, 1.0),                       # the reference, old style
                rec(s, "full", 1.0, "q8_0", 530, 1.0),
                rec(s, "full", 1.0, "q4_0", 280, 1.0 if i < 3 else 0.0),          # 0.75
                rec(s, "hybridkv", 0.25, "f16", 700, 1.0),
                rec(s, "hybridkv", 0.25, "q8_0", 400, 1.0 if i < 2 else 0.0),     # 0.5: under q8_0 alone, not front
                rec(s, "hybridkv", 0.1, "q4_0", 190 + i, 1.0 if i < 2 else 0.0),  # 0.5 at 0.1915
                rec(s, "hybridkv@before", 0.25, "q4_0", 220, 0.0, regime="before")]
    return out


def test_points_pair_with_the_f16_full_cache():
    pts = {(p.task, p.regime, p.method, p.budget, p.cache_type): p for p in frontier.points(records())}
    q4 = pts[("passkey", "after", "full", 1.0, "q4_0")]
    assert (q4.n, q4.bytes_ratio, q4.relative, q4.label) == (4, 0.28, 0.75, "q4_0 alone")
    h = pts[("passkey", "after", "hybridkv", 0.1, "q4_0")]
    assert h.bytes_ratio == pytest.approx(0.1915) and h.relative == 0.5
    assert h.ci is not None and h.ci[0] <= 0.5 <= h.ci[1] and 0 <= h.ci[0] < h.ci[1] <= 1
    # every needle task also pooled; no eviction is a point of every regime (the same cache)
    assert ("retrieval", "after", "full", 1.0, "q4_0") in pts
    assert pts[("passkey", "before", "full", 1.0, "q8_0")].relative == 1.0
    assert pts[("passkey", "before", "hybridkv", 0.25, "q4_0")].relative == 0.0


def test_the_front_is_monotone_and_the_best_at_or_under_each_size():
    pts = [p for p in frontier.points(records()) if p.task == "passkey" and p.regime == "after"]
    f = frontier.front(pts)
    assert [(p.cache_type, p.method) for p in f] == [("q4_0", "hybridkv"), ("q4_0", "full"), ("q8_0", "full")]
    xs, ys = [p.bytes_ratio for p in f], [p.relative for p in f]
    assert xs == sorted(xs) and all(a < b for a, b in zip(ys, ys[1:]))
    assert {p.label for p in pts if p.on_front} == {p.label for p in f}
    # at or under each size: the best of the points that fit, checked against a plain search
    for size in (0.2, 0.25, 0.3, 0.45, 0.6, 1.0):
        best = frontier.best_at(pts, size)
        fits = [p.relative for p in pts if p.bytes_ratio <= size]
        assert best.relative == max(fits) and best.bytes_ratio <= size
        assert best.relative == max(p.relative for p in f if p.bytes_ratio <= size)
    assert frontier.best_at(pts, 0.1) is None


def test_report_only_writes_the_frontier(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records()))
    r = CliRunner().invoke(cli, ["eval", "--report-only", "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "frontier.md").read_text()
    assert "| * | q4_0 alone | 0.280 |" in md and "hybridkv 0.25 on q8_0" in md
    assert (out / "frontier.png").stat().st_size > 10_000
    data = json.loads((out / "frontier.json").read_text())
    assert {p["cache_type"] for p in data["points"]} == {"f16", "q8_0", "q4_0"}
    # the old report still reads: quantized records as methods of their own next to the f16 reference
    assert "full[q4_0]" in (out / "results.md").read_text()


def test_thinned_window_points_reach_the_table_and_the_paired_script(tmp_path):
    """`hybridkv+swa0.1` records: a point of their own, a table row with the window share (the knob sets
    --swa-budget from it), and a paired difference against the block whole on the same samples."""
    recs = records() + [rec(s, "hybridkv+swa0.1", 0.25, "f16", 150, 1.0 if s != "d" else 0.0) for s in "abcd"]
    (tmp_path / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    load = _load_script
    table = load("kv_memory_table").build_table(tmp_path)
    row = next(p for p in table["points"] if p["swa_budget"] < 1)
    assert (row["method"], row["swa_budget"], row["budget"], row["ratio"], row["score"]) == ("hybridkv", 0.1, 0.25,
                                                                                           0.15, 0.75)
    assert all(p["swa_budget"] == 1.0 for p in table["points"] if p is not row)
    from edgekv import kv_memory as km

    assert km.pick(0.2, table).swa_budget == 0.1
    lines = load("swa_paired").rows(tmp_path)
    assert len(lines) == 3 and lines[2].startswith("| hybridkv 0.25, window 0.1, f16 | 4 | 1.00 | 0.75 | -0.25 [")
    assert lines[2].endswith("| 0.700 -> 0.150 |")


def _load_script(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod      # a script's dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_a_table_over_several_lengths_pools_and_keeps_the_worst(tmp_path):
    """Two runs (two document lengths, other samples): a configuration measured in both gets its largest byte
    ratio, the score of all four samples pooled, its lowest run's score; one measured in a single run is left
    out, as a pick must have been measured at every length."""
    short = [rec(s, "full", 1.0, None, FULL_BYTES, 1.0) for s in "ab"] + \
        [rec("a", "full", 1.0, "q4_0", 280, 1.0), rec("b", "full", 1.0, "q4_0", 280, 1.0),
         rec("a", "hybridkv", 0.25, "f16", 700, 1.0), rec("b", "hybridkv", 0.25, "f16", 700, 0.0),
         rec("a", "hybridkv", 0.1, "q8_0", 90, 1.0), rec("b", "hybridkv", 0.1, "q8_0", 90, 1.0)]
    long = [rec(s, "full", 1.0, None, FULL_BYTES, 1.0) for s in "cd"] + \
        [rec("c", "full", 1.0, "q4_0", 280, 1.0), rec("d", "full", 1.0, "q4_0", 280, 0.0),
         rec("c", "hybridkv", 0.25, "f16", 500, 1.0), rec("d", "hybridkv", 0.25, "f16", 500, 1.0)]
    runs = []
    for name, recs in (("1k", short), ("8k", long)):
        (tmp_path / name).mkdir()
        (tmp_path / name / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in recs))
        runs.append(tmp_path / name)
    table = _load_script("kv_memory_table").build_table(*runs)
    rows = {(p["cache_type"], p["method"], p["budget"]): p for p in table["points"]}
    assert set(rows) == {("f16", "full", 1.0), ("q4_0", "full", 1.0), ("f16", "hybridkv", 0.25)}
    h = rows[("f16", "hybridkv", 0.25)]
    assert (h["ratio"], h["score"], h["worst"], h["n"]) == (0.7, 0.75, 0.5, 4)
    assert [(r["ratio"], r["score"], r["n"]) for r in h["runs"]] == [(0.7, 0.5, 2), (0.5, 1.0, 2)]
    q4 = rows[("q4_0", "full", 1.0)]
    assert (q4["ratio"], q4["score"], q4["worst"]) == (0.28, 0.75, 0.5)
    # the front on the table's axes: q4_0 alone (0.75 at 0.28) is, hybridkv (0.75 at 0.7) is not
    assert [p["front"] for p in table["points"]] == [True, False, True]
    from edgekv import kv_memory as km

    p = km.pick(0.8, table)
    assert (p.cache_type, p.budget, p.score, p.worst) == ("f16", 0.25, 0.75, 0.5)   # tie at 0.75: the larger


def test_the_paired_script_pairs_two_points_per_cache_type(tmp_path):
    """scripts/paired.py: A - B on the samples both hold, per cache type, with the interval around it."""
    (tmp_path / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records()))
    lines = _load_script("paired").rows(tmp_path, "hybridkv 0.25", "full 1")
    # f16: hybridkv 4/4 against the full cache 4/4; q8_0: 2/4 against 4/4 (q8_0 alone); q4_0 has no hybridkv 0.25
    assert lines[2] == "| f16 | 4 | 1.00 | 1.00 | +0.00 [+0.00, +0.00] | 0.700, 1.000 |"
    assert lines[3].startswith("| q8_0 | 4 | 0.50 | 1.00 | -0.50 [-1.00, ") and lines[3].endswith("| 0.400, 0.530 |")
    assert len(lines) == 4
