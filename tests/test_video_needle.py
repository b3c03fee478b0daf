"""scripts/bench_video_needle.py at a tiny size on the real Gemma 3 270M: the script runs end to end, the full
cache finds the needle read from text-in-pixels video frames, and the streamed run stays within B + C."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import THREADS

pytestmark = [pytest.mark.gemma, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_video_needle.py"


def test_video_needle_script_runs_and_full_cache_finds_the_needle(tmp_path, gemma_path):
    spec = importlib.util.spec_from_file_location("bench_video_needle", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "vn"
    rc = bench.main(["--tasks", "passkey", "--lengths", "512", "--depths", "0.5", "--ratios", "0.2",
                     "--runs", "generic", "--threads", str(THREADS), "--model", str(gemma_path), "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "video-needle.json").read_text())
    by = {r["run"]: r for r in data["records"]}
    full, streamed = by["full"], by["generic"]
    assert full["frames"] == 2 and full["media_tokens"] == 512          # the document as two 256-token frames
    assert full["score"] == 1.0, full["generated"]                      # the needle is read from a frame
    assert streamed["ratio"] == 0.2 and streamed["frames"] == 2
    assert streamed["final_cells"] < full["final_cells"]                # frames were compacted
    assert streamed["peak_cells"] <= streamed["final_cells"] + streamed["chunk_cells"] < full["peak_cells"] + 256
    assert any("probe: generic" in m for m in streamed["methods"])
    pooled = [r for r in data["summary"] if r["task"] == "all"]
    assert [r["run"] for r in pooled] == ["full", "generic"] and pooled[0]["relative"] == 1.0
    assert "| full cache |" in (out / "video-needle.md").read_text()
