"""--kv-memory: the pick from a measured table, explicit --budget / -ctk / -ctv overriding it, a size no point
reaches (one Error line, exit 2), and the context llama.cpp allocates following the knob. Also the eval grid
over cache types: records with cache_type and kv_bytes, checked against the bytes llama.cpp's cells cost."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgekv import kv_memory as km
from edgekv.cli.main import cli

from conftest import THREADS

TABLE = {"source": {"model": "hand-made", "task": "retrieval", "n": 1, "date": "today", "command": "by hand"},
         "points": [
             {"cache_type": "f16", "budget": 1.0, "method": "full", "ratio": 1.0, "score": 1.0, "n": 8},
             {"cache_type": "f16", "budget": 0.5, "method": "hybridkv", "ratio": 0.6, "score": 0.97, "n": 8},
             {"cache_type": "q8_0", "budget": 1.0, "method": "full", "ratio": 0.53, "score": 0.96, "n": 8},
             {"cache_type": "q8_0", "budget": 0.25, "method": "hybridkv", "ratio": 0.3, "score": 0.96, "n": 8},
             {"cache_type": "q8_0/q4_0", "budget": 0.1, "method": "hybridkv", "ratio": 0.2, "score": 0.7, "n": 8},
             {"cache_type": "q4_0", "budget": 0.1, "method": "hybridkv", "ratio": 0.15, "score": 0.5, "n": 8},
         ]}


@pytest.fixture
def table(tmp_path, monkeypatch):
    p = tmp_path / "kv_memory.json"
    p.write_text(json.dumps(TABLE))
    monkeypatch.setenv(km.TABLE_ENV, str(p))
    return p


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


# --- the pick ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,want", [
    (1.0, ("f16", "f16", 1.0)),
    (0.6, ("f16", "f16", 0.5)),
    (0.55, ("q8_0", "q8_0", 1.0)),      # 0.96 at 0.53 and at 0.3: the larger one, the memory is granted
    (0.4, ("q8_0", "q8_0", 0.25)),
    (0.2, ("q8_0", "q4_0", 0.1)),       # a K/V pair
    (0.15, ("q4_0", "q4_0", 0.1)),
])
def test_pick_is_the_best_point_at_or_under_the_ratio(table, ratio, want):
    p = km.pick(ratio)
    assert tuple(p) == want and p.ratio <= ratio
    # the same against the table read by hand: the best score among the points that fit
    fits = [q for q in TABLE["points"] if q["ratio"] <= ratio]
    assert p.score == max(q["score"] for q in fits)


def test_a_ratio_no_point_reaches_is_an_error(table):
    with pytest.raises(km.KVMemoryError, match="no measured combination is that small.*0.15"):
        km.pick(0.1)


@pytest.mark.parametrize("text,ratio,nbytes", [("0.25", 0.25, None), ("25%", 0.25, None), ("1", 1.0, None),
                                               ("300MB", None, 300_000_000), ("1.5GiB", None, int(1.5 * 2**30)),
                                               ("64 KiB", None, 65536)])
def test_parse_kv_memory(text, ratio, nbytes):
    t = km.parse_kv_memory(text)
    assert (t.ratio, t.nbytes) == (ratio, nbytes)


@pytest.mark.parametrize("text", ["abc", "0", "-0.5", "2", "300XB", ""])
def test_parse_kv_memory_refuses(text):
    with pytest.raises(km.KVMemoryError):
        km.parse_kv_memory(text)


def test_python_api_model_options(table):
    opts, budget, p = km.model_options(0.4)
    assert (opts.cache_type_k, opts.cache_type_v, budget) == ("q8_0", "q8_0", 0.25) and p.cache_type == "q8_0"


def test_the_package_table_has_its_provenance_and_a_front():
    t = km.load_table(str(km.TABLE))
    src = t["source"]
    assert src["command"].startswith(("edgekv eval", "main.py eval")) and src["n"] >= 1 and src["model"]
    assert t["points"] and all(km.parse_cache_type(p["cache_type"]) for p in t["points"])
    assert km.pick(1.0).score == max(p["score"] for p in t["points"])


def test_the_package_pick_at_a_quarter_beats_both_levers_alone_at_every_length():
    """Issue 21's target, read off the package table's own measurements: at every length measured, what
    `--kv-memory 0.25` picks scores at least the better of q4_0 alone and hybridkv at budget 0.25 on f16
    (the same samples: each run pairs its points with its own f16 cache)."""
    t = km.load_table(str(km.TABLE))
    p = km.pick(0.25, t)
    rows = {(r["cache_type"], r["method"], r["budget"], r.get("swa_budget", 1.0)): r for r in t["points"]}
    picked = rows[(p.cache_type, "full" if p.budget >= 1 else "hybridkv", p.budget, p.swa_budget)]
    q4, evict = rows[("q4_0", "full", 1.0, 1.0)], rows[("f16", "hybridkv", 0.25, 1.0)]
    assert len(t["source"]["runs"]) == len(picked["runs"]) >= 3 and len(t["source"]["lengths"]) >= 3
    for got, a, b in zip(picked["runs"], q4["runs"], evict["runs"]):
        assert got["run"] == a["run"] == b["run"]
        assert got["score"] >= max(a["score"], b["score"]) and got["ratio"] <= 0.25, (got, a, b)
    assert p.worst == min(r["score"] for r in picked["runs"]) and "at worst over 1024-8192 tokens" in p.describe()


@pytest.mark.parametrize("n_ctx", [1024, 4096])
def test_full_f16_bytes_is_llama_cpps_allocation(gemma_path, monkeypatch, n_ctx):
    """The formula against the sizes llama.cpp logs when it allocates the cache (both blocks)."""
    import collections
    import re

    from edgekv.runtime import Model, lib

    monkeypatch.setattr(lib, "LOG_LINES", collections.deque(maxlen=100_000))
    with Model.load(gemma_path, n_ctx=n_ctx, n_batch=512, threads=THREADS, capture_queries=False) as m:
        logged = [float(x) for x in re.findall(r"llama_kv_cache: size =\s+([0-9.]+) MiB", "".join(lib.LOG_LINES))]
        assert len(logged) == 2    # the global block and the sliding-window block
        assert km.full_f16_bytes(m.layout, n_ctx) == pytest.approx(sum(logged) * 2**20, abs=0.01 * 2**20)


# --- the CLI -------------------------------------------------------------------------------------------
def _picked(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("edgekv: --kv-memory")]
    assert len(lines) == 1, output
    return lines[0]


def test_chat_picks_overrides_and_refuses(table, gemma_path):
    base = ("chat", "-m", gemma_path, "-p", "hi", "-n", 1, "-t", THREADS, "-c", 1024, "--no-report")
    r = run(*base, "--kv-memory", "0.4")
    assert r.exit_code == 0, r.output
    line = _picked(r.output)
    assert "q8_0 cache, budget 0.25" in line and "using K q8_0, V q8_0, budget 0.25; context 256 cells" in line
    # explicit --budget and -ctv win; the rest of the pick stays
    r = run(*base, "--kv-memory", "0.4", "--budget", "0.5", "-ctv", "f16")
    assert r.exit_code == 0, r.output
    assert "using K q8_0, V f16, budget 0.5; context 512 cells" in _picked(r.output)
    # a size in bytes: the share of the full f16 cache of -c cells
    full = None
    from edgekv.runtime import Model

    with Model.load(gemma_path, n_ctx=16, n_batch=16, threads=1, capture_queries=False) as m:
        full = km.full_f16_bytes(m.layout, 1024)
    r = run(*base, "--kv-memory", f"{int(0.62 * full)}B")
    assert r.exit_code == 0, r.output
    assert "= 0.62 of the f16 cache: f16 cache, budget 0.5" in _picked(r.output)
    # no point that small: one Error line, exit 2, nothing loaded
    for value in ("0.1", f"{int(0.05 * full)}B"):
        r = run(*base, "--kv-memory", value)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines()[-1].startswith("Error: --kv-memory 0.") and "that small" in r.output
    r = run(*base, "--kv-memory", "lots")
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("Error: --kv-memory takes a ratio")


def test_the_context_follows_the_knob(table, tiny_pairs):
    """10 image chunks of 256 tokens in a 4096-cell -c: --kv-memory 0.6 (budget 0.5) allocates 2048 cells and
    answers; 0.3 (budget 0.25, 1024 cells) too; 0.15 (budget 0.1: 410 cells) cannot hold the chunk being
    compacted next to the ones kept, and llama.cpp's context says so."""
    model, mmproj, image = tiny_pairs["llava-tiles"]
    base = ("chat", "-m", model, "--mmproj", mmproj, "--image", image, "-p", "describe this", "-n", 4,
            "-t", THREADS, "-b", 2048, "-c", 4096)
    for ratio, cells in (("0.6", 2048), ("0.3", 1024)):
        r = run(*base, "--kv-memory", ratio)
        assert r.exit_code == 0, r.output
        assert f"context {cells} cells" in _picked(r.output)
        assert "media tokens 2560" in r.output
    r = run(*base, "--kv-memory", "0.15")
    assert r.exit_code == 2 and "of 410 are free" in r.output, r.output
    # the knob set the context: the hint names it, not -c (ignored here) nor a --max-kv-cells nobody passed
    error = r.output.strip().splitlines()[-1]
    assert "--kv-memory" in error and "--max-kv-cells" not in error and "-c/--ctx-size" not in error, error


def test_caption_and_serve_take_the_knob(table, tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    out = tmp_path / "caps.jsonl"
    r = run("caption", "-m", model, "--mmproj", mmproj, str(image), "-o", out, "-n", 2, "-t", THREADS,
            "--kv-memory", "0.4", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "using K q8_0, V q8_0, budget 0.25" in _picked(r.output) and out.read_text().strip()
    r = run("caption", "-m", model, "--mmproj", mmproj, str(image), "-o", tmp_path / "b.jsonl", "--kv-memory", "0.01")
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("Error: --kv-memory 0.01"), r.output
    r = run("serve", "-m", model, "--mmproj", mmproj, "--kv-memory", "0.01", "--port", 0)
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("Error: --kv-memory 0.01"), r.output


# --- the eval grid over cache types --------------------------------------------------------------------
def _cell_bytes(layout, type_name: str) -> int:
    """K+V bytes of one cell in every layer, from gguf's own block table (not edgekv's)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]
    per_layer = layout.n_head_kv * (layout.head_dim + layout.head_dim_v) * size // block
    return per_layer * layout.n_layer


def test_eval_over_cache_types_records_their_bytes(gemma_path, tmp_path):
    from edgekv.eval.runner import load_records
    from edgekv.runtime import Model

    out = tmp_path / "ev"
    r = run("eval", "--quick", "--tasks", "passkey,continuation", "--methods", "snapkv", "--cache-types", "f16,q8_0",
            "-m", gemma_path, "-t", THREADS, "--out", out, "--no-progress", "--no-plots")
    assert r.exit_code == 0, r.output
    recs = load_records(out)
    by = {(x["task"], x["method"], x["cache_type"]): x for x in recs}
    assert {k[2] for k in by} == {"f16", "q8_0"} and len(recs) == 8
    with Model.load(gemma_path, n_ctx=16, n_batch=16, threads=1, capture_queries=False) as m:
        lay = m.layout
    for task in ("passkey", "continuation"):
        f16, q8 = by[(task, "full", "f16")], by[(task, "full", "q8_0")]
        n = f16["n_prompt"]   # uncompacted, under the 512-cell window: every layer holds every prompt cell
        assert f16["kv_bytes"] == n * _cell_bytes(lay, "f16") == f16["kv_bytes_full_f16"]
        assert q8["kv_bytes"] == n * _cell_bytes(lay, "q8_0") and q8["kv_bytes_full_f16"] == f16["kv_bytes"]
        s16, s8 = by[(task, "snapkv", "f16")], by[(task, "snapkv", "q8_0")]
        assert s8["kv_bytes"] < s16["kv_bytes"] < f16["kv_bytes"] and s8["kv_bytes"] < q8["kv_bytes"]
    # continuation on q8_0 is scored against the f16 full cache: its own full run is not 1.0 by definition
    cont = by[("continuation", "full", "q8_0")]
    assert 0 < cont["top1"] <= 1 and cont["kl"] > 0
    assert (out / "frontier.md").exists() and "q8_0 alone" in (out / "frontier.md").read_text()
    # resuming runs nothing; old-style keys (no cache type) are the f16 records
    r = run("eval", "--quick", "--tasks", "passkey,continuation", "--methods", "snapkv", "--cache-types", "f16,q8_0",
            "-m", gemma_path, "-t", THREADS, "--out", out, "--no-progress", "--no-plots")
    assert r.exit_code == 0 and len(load_records(out)) == 8
    assert by[("passkey", "full", "f16")]["key"].count("|") == 2
    assert by[("passkey", "full", "q8_0")]["key"].endswith("|q8_0")


def test_eval_cache_types_refused_clearly(gemma_path, tmp_path):
    r = run("eval", "--quick", "--cache-types", "f16,q5_1", "-m", gemma_path, "--out", tmp_path / "x")
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("Error: cache type 'q5_1'"), r.output


def test_report_compares_a_quantized_cache_with_full_f16(tiny_pairs):
    """The report's `KV vs f16` line: the cache now against every prefilled cell at f16, as the cells and
    gguf's block sizes give it; none on an f16 cache."""
    import re

    from edgekv.runtime import Model

    model, mmproj, image = tiny_pairs["llava-tiles"]
    args = ("chat", "-m", model, "--mmproj", mmproj, "--image", image, "-p", "describe", "-n", 3, "-t", THREADS,
            "-b", 2048, "-c", 4096, "--budget", 0.25)
    r = run(*args, "-ctk", "q8_0", "-ctv", "q8_0")
    assert r.exit_code == 0, r.output
    before, after = map(int, re.search(r"KV cells\s+(\d+) -> (\d+)", r.output).groups())
    pct, n = map(int, re.search(r"KV vs f16 .* = (\d+)% of the full f16 cache of the (\d+) cells prefilled",
                                r.output).groups())
    with Model.load(model, n_ctx=16, n_batch=16, threads=1, capture_queries=False) as m:
        lay = m.layout
    now = n - (before - after)
    assert n > before and pct == round(100 * now * _cell_bytes(lay, "q8_0") / (n * _cell_bytes(lay, "f16")))
    r = run(*args)
    assert r.exit_code == 0 and "KV vs f16" not in r.output and "of those cells at f16" not in r.output


def test_a_quantized_v_pick_with_flash_attention_off_is_one_error(table, tiny_pairs):
    model, mmproj, image = tiny_pairs["llava"]
    r = run("chat", "-m", model, "--mmproj", mmproj, "-p", "hi", "-n", 1, "-t", THREADS, "--kv-memory", "0.4",
            "-fa", "off")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1] == ("Error: a quantized V cache (q8_0) needs flash attention: use "
                                                 "--flash-attn on (or auto), or --cache-type-v f16")
    r = run("chat", "-m", model, "--mmproj", mmproj, "-p", "hi", "-n", 1, "-t", THREADS, "--kv-memory", "0.4",
            "-fa", "off", "-ctv", "f16", "--no-report")
    assert r.exit_code == 0 and "using K q8_0, V f16, budget 0.25" in _picked(r.output), r.output


def test_a_point_with_a_thinned_window_block(tmp_path, monkeypatch, gemma_path):
    """A table point measured with `hybridkv+swa0.25` carries the window block's share into the pick, the
    line on stderr and the Session; an explicit --swa-budget wins over it."""
    t = dict(TABLE, points=TABLE["points"] + [{"cache_type": "q4_0", "budget": 0.25, "method": "hybridkv",
                                               "swa_budget": 0.25, "ratio": 0.08, "score": 0.8, "n": 8}])
    p = tmp_path / "kv_memory.json"
    p.write_text(json.dumps(t))
    monkeypatch.setenv(km.TABLE_ENV, str(p))
    got = km.pick(0.1)
    assert tuple(got) == ("q4_0", "q4_0", 0.25) and got.swa_budget == 0.25
    assert km.pick(0.4).swa_budget == 1.0            # a point without the field keeps the whole block
    base = ("chat", "-m", gemma_path, "-p", "hi", "-n", 1, "-t", THREADS, "-c", 1024, "--no-report")
    r = run(*base, "--kv-memory", "0.1")
    assert r.exit_code == 0, r.output
    assert "budget 0.25, sliding-window block 0.25" in _picked(r.output)
    r = run(*base, "--kv-memory", "0.1", "--swa-budget", "1")
    assert r.exit_code == 0, r.output
    line = _picked(r.output)
    assert "given explicitly: --swa-budget 1" in line and line.endswith("budget 0.25; context 256 cells"), line
