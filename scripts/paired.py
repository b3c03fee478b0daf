"""Two points of an `edgekv eval` run, paired on the same samples: `A` against `B` for every cache type.

    python scripts/paired.py results/frontier/allocator "mixkv-pyramidkv 0.125" "hybridkv 0.25" [--task retrieval]

A point is `method budget` (the method as the eval names it: `hybridkv+swa0.1`, `full 1`). Prints a markdown
table row per cache type holding both: n, the accuracy of each, A - B with a paired bootstrap 95 % interval
(scripts/swa_paired.py's), and both byte ratios to the full f16 cache.
"""
from __future__ import annotations

import argparse
import importlib.util
from collections import defaultdict
from pathlib import Path

from edgekv.eval.report import RETRIEVAL_TASKS
from edgekv.eval.runner import load_records

_spec = importlib.util.spec_from_file_location("swa_paired", Path(__file__).with_name("swa_paired.py"))
_swa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_swa)
diff_ci = _swa.diff_ci


def parse_point(text: str) -> tuple[str, float]:
    method, _, budget = text.strip().rpartition(" ")
    if not method:
        raise SystemExit(f"{text!r}: write a point as `method budget`, e.g. `hybridkv 0.25`")
    return method, float(budget)


def rows(run: Path, a: str, b: str, task: str = "retrieval") -> list[str]:
    pa, pb = parse_point(a), parse_point(b)
    by = defaultdict(dict)   # (method, budget, cache type) -> sample -> record
    for r in load_records(run):
        if r.get("score") is None or not r.get("kv_bytes_full_f16") or r.get("regime", "after") != "after":
            continue
        if (r["task"] in RETRIEVAL_TASKS) if task == "retrieval" else r["task"] == task:
            by[(r["method"].partition("@")[0], float(r["budget"]), r.get("cache_type") or "f16")][r["sample"]] = r
    out = [f"| cache | n | {a} | {b} | A - B [95 % CI] | bytes / f16: A, B |", "|---|---|---|---|---|---|"]
    for ct in sorted({k[2] for k in by}):
        ra, rb = by.get((*pa, ct)), by.get((*pb, ct))
        common = sorted(set(ra or {}) & set(rb or {}))
        if len(common) < 2:
            continue
        pairs = [(float(ra[s]["score"]), float(rb[s]["score"])) for s in common]
        lo, hi = diff_ci(pairs)
        n = len(pairs)
        ratio = [sum(d[s]["kv_bytes"] / d[s]["kv_bytes_full_f16"] for s in common) / n for d in (ra, rb)]
        out.append(f"| {ct} | {n} | {sum(p[0] for p in pairs) / n:.2f} | {sum(p[1] for p in pairs) / n:.2f} | "
                   f"{sum(x - y for x, y in pairs) / n:+.2f} [{lo:+.2f}, {hi:+.2f}] | {ratio[0]:.3f}, {ratio[1]:.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("a", help="a point: `method budget`")
    ap.add_argument("b", help="the point it is paired with")
    ap.add_argument("--task", default="retrieval", help="a task, or retrieval: every needle task pooled")
    args = ap.parse_args()
    print("\n".join(rows(args.run, args.a, args.b, args.task)))


if __name__ == "__main__":
    main()
