"""Decode-speed and memory benches on a tiny synthetic model (mechanics only; timings mean nothing here)."""
from __future__ import annotations

import pytest

from conftest import THREADS


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from edgekv.testing.tiny import build_text_model

    return build_text_model(tmp_path_factory.mktemp("bench") / "small.gguf", n_layer=2, n_embd=128, n_head=4,
                            n_head_kv=2, head_dim=32, n_ff=256, weight_type="q8_0")


def test_decode_bench_fills_compacts_and_bounds(small_model, tmp_path):
    from edgekv.eval.decode import bench_decode, bench_prefill, markdown_table, rows_as_dicts, weight_bytes
    from edgekv.eval.plots import plot_decode

    rows = bench_decode(small_model, contexts=(384,), budgets=(0.25,), n_tokens=2, threads=THREADS, log=lambda m: None)
    full, comp = rows
    assert full.method == "full" and full.cells == 384 and comp.method == "snapkv"
    assert comp.cells < 0.4 * full.cells and comp.kv_bytes < full.kv_bytes
    w = weight_bytes(small_model)
    assert comp.bound == pytest.approx((w + full.kv_bytes) / (w + comp.kv_bytes))
    assert comp.bound > 1 and comp.speedup > 0 and comp.compact_s > 0
    pre = bench_prefill(small_model, 128, threads=THREADS)
    assert pre["tokens_per_s"] > 0
    table = markdown_table(rows, pre)
    assert "| 384 | snapkv | 0.25 |" in table and "bound" in table
    png = plot_decode(rows_as_dicts(rows), tmp_path / "d.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_memory_runs_in_subprocesses(small_model):
    from edgekv.eval.memory import budget_n_ctx, measure

    assert budget_n_ctx(8000, 40, 0.1, 1024, 32, 16) < 8000 // 3
    full = measure("full", small_model, 512, threads=THREADS)
    small = measure("budget", small_model, 512, budget=0.25, chunk=128, threads=THREADS)
    assert small.n_ctx < full.n_ctx and small.cells < full.cells and small.kv_bytes < full.kv_bytes
    assert small.compact_s > 0 and full.compact_s == 0
    for r in (full, small):
        assert r.peak_rss_mb >= r.baseline_rss_mb > 0 and r.polled_peak_rss_mb > 0
