#!/usr/bin/env python
"""Peak RSS of a full-cache run against a run whose context is sized for the budget (chunked prefill,
compaction between chunks), each in its own subprocess, on the same real-text passkey prompt.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_memory.py [--model GGUF] [--tokens 8192] [--budgets 0.1]
        [--methods snapkv,hybridkv] [--chunk 1024] [--out results/memory]

Default model: Gemma 3 270M (edgekv[eval]). Writes memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from edgekv.eval.memory import measure

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budgets", default="0.1")
    ap.add_argument("--methods", default="snapkv", help="Comma-separated methods for the budget-sized runs.")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/memory"))
    a = ap.parse_args(argv)
    if a.model is None:
        from edgekv.eval.gemma import gemma_path

        a.model = gemma_path()
    a.out.mkdir(parents=True, exist_ok=True)
    runs = []
    t0 = time.perf_counter()
    r = measure("full", a.model, a.tokens, threads=a.threads)
    runs.append({"budget": 1.0, **asdict(r)})
    print(f"full: {r}", flush=True)
    for m in a.methods.split(","):
        for b in (float(x) for x in a.budgets.split(",")):
            r = measure("budget", a.model, a.tokens, budget=b, method=m, chunk=a.chunk, threads=a.threads)
            runs.append({"budget": b, "method": m, **asdict(r)})
            print(f"{m} @ {b}: {r}", flush=True)
    cmd = "python scripts/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd, "model": str(a.model), "tokens": a.tokens, "methods": a.methods, "chunk": a.chunk,
            "threads": a.threads, "seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg": os.getloadavg()}
    (a.out / "memory.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    lines = [f"# Peak memory: full cache vs context sized for the budget ({Path(a.model).name}, {a.tokens}-token prompt)",
             "", f"`{cmd}`, {meta['date']}. Each run is a fresh subprocess; peak RSS = max(ru_maxrss, psutil "
             "polling every 20 ms). Same real-text passkey prompt in both; 'answer' = the greedy answer holds the key.",
             "", "| run | n_ctx | cells after | KV MiB (all blocks) | RSS after load MiB | peak RSS MiB | "
             "peak - load MiB | prefill s | compaction s | answer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        peak = max(r["peak_rss_mb"], r["polled_peak_rss_mb"])
        name = "full cache" if r["mode"] == "full" else f"{r['method']} @ {r['budget']:g}, chunks of {a.chunk}"
        lines.append(f"| {name} | {r['n_ctx']} | {r['cells']} | {r['kv_bytes'] / 2**20:.1f} | {r['baseline_rss_mb']:.0f} | "
                     f"{peak:.0f} | {peak - r['baseline_rss_mb']:.0f} | {r['prefill_s']:.1f} | {r['compact_s']:.2f} | "
                     f"{'yes' if r['answer_ok'] else 'no'} ({r['generated'].strip()[:12]!r}) |")
    (a.out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
