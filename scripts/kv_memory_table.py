"""Write edgekv/data/kv_memory.json, the table `--kv-memory` picks from, out of `edgekv eval --cache-types` runs.

    python scripts/kv_memory_table.py results/frontier/media-1k2k results/frontier/media-4k \
        results/frontier/media-8k [--task retrieval] [--regime after]

One run or several (e.g. one per document length). A point is a configuration (cache type, method, budget,
the sliding-window block's share: `hybridkv+swa0.25` runs; 1 otherwise) measured in every run given, with:
- `ratio`: its largest byte ratio to the full f16 cache over the runs (it fits that share at every length
  measured; the window block is a fixed 512 cells, so the ratio moves with length);
- `score`, `ci`, `n`: its score relative to the full f16 cache over every sample of every run pooled, with
  a paired bootstrap 95 % interval (edgekv/eval/frontier.py);
- `worst`: its lowest relative score in any one run; `runs`: each run's own ratio, score, interval and n;
- `front`: it sets a new best pooled score going up in bytes.
A configuration missing from a run is left out: a pick must have been measured at every length. And the
provenance (the runs' commands, model, date, n).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from edgekv.eval.engine import split_swa
from edgekv.eval.frontier import Point, front, points
from edgekv.eval.runner import CONFIG, load_records
from edgekv.kv_memory import TABLE


def _key(p: Point) -> tuple:
    method, swa = split_swa(p.method)
    return p.cache_type, method, p.budget, swa


def _commands(run_dir: Path) -> list[str]:
    cmd = run_dir / "commands.txt"
    # as typed; `python -m edgekv.cli.main` recorded itself as main.py
    return [re.sub(r"^main\.py ", "edgekv ", ln.split("  ", 1)[-1]) for ln in cmd.read_text().splitlines()] \
        if cmd.exists() else []


def _rounded(p: Point) -> dict:
    return {"ratio": round(p.bytes_ratio, 4), "score": round(p.relative, 4),
            "ci": [round(c, 4) for c in p.ci] if p.ci else None, "n": p.n}


def build_table(*run_dirs: Path, task: str = "retrieval", regime: str = "after") -> dict:
    def mine(recs: list[dict]) -> dict[tuple, Point]:
        return {_key(p): p for p in points(recs) if p.task == task and p.regime == regime and p.relative is not None}

    runs = [Path(r) for r in run_dirs]
    records = [load_records(r) for r in runs]
    per_run = [mine(recs) for recs in records]
    if not all(per_run):
        empty = next(r for r, pts in zip(runs, per_run) if not pts)
        raise SystemExit(f"no points for task {task!r}, regime {regime!r} in {empty} (records with kv_bytes?)")
    pooled = mine([r for recs in records for r in recs])   # the samples of different lengths are different
    keys = [k for k in pooled if all(k in pts for pts in per_run)]
    rows = []
    for k in keys:
        each = [pts[k] for pts in per_run]
        ct, method, budget, swa = k
        rows.append({"cache_type": ct, "budget": budget, "method": method, "swa_budget": swa,
                     "ratio": round(max(p.bytes_ratio for p in each), 4),
                     **{f: v for f, v in _rounded(pooled[k]).items() if f != "ratio"},
                     "worst": round(min(p.relative for p in each), 4),
                     "runs": [{"run": str(r), **_rounded(p)} for r, p in zip(runs, each)]})
    rows.sort(key=lambda p: (p["ratio"], -p["score"]))
    best = None
    for p in rows:   # the front on the table's own axes (largest ratio, pooled score)
        p["front"] = best is None or p["score"] > best
        best = p["score"] if best is None else max(best, p["score"])
    cfgs = [json.loads((r / CONFIG).read_text()).get("grid", {}) if (r / CONFIG).exists() else {} for r in runs]
    commands = [c for r in runs for c in _commands(r)]
    return {
        "source": {"runs": [str(r) for r in runs], "command": commands[0] if commands else "?",
                   "commands": commands,
                   "model": Path(cfgs[0].get("model", "?")).name, "task": task, "regime": regime,
                   "n": min(p["n"] for p in rows) if rows else 0,
                   "lengths": sorted({n for c in cfgs for n in c.get("spec", {}).get("lengths", [])}),
                   "date": time.strftime("%Y-%m-%d"), "media": bool(cfgs[0].get("media")),
                   "flash_attn": cfgs[0].get("flash_attn", "off")},
        "points": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="`edgekv eval --cache-types ...` --out folders")
    ap.add_argument("--task", default="retrieval", help="task of the front (default: every needle task pooled)")
    ap.add_argument("--regime", default="after")
    ap.add_argument("-o", "--out", type=Path, default=TABLE)
    a = ap.parse_args()
    table = build_table(*a.runs, task=a.task, regime=a.regime)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"{a.out}: {len(table['points'])} points measured in all of {', '.join(map(str, a.runs))} "
          f"(n={table['source']['n']} pooled)")
    for p in table["points"]:
        print(f"  {'*' if p['front'] else ' '} {p['cache_type']:>10} {p['method']:>9} {p['budget']:<5g} "
              f"swa {p['swa_budget']:<5g} bytes {p['ratio']:.3f}  score {p['score']:.2f} (worst {p['worst']:.2f}: "
              + ", ".join(f"{r['score']:.2f}" for r in p["runs"]) + ")")


if __name__ == "__main__":
    main()
