"""Write edgekv/data/kv_memory.json, the table `--kv-memory` picks from, out of an `edgekv eval --cache-types` run.

    python scripts/kv_memory_table.py results/frontier/media-1k2k [--task retrieval] [--regime after]

Keeps every point of one task and regime (`front`: it sets a new best score going up in bytes, see
edgekv/eval/frontier.py), each with its cache type, budget, the sliding-window block's share (`hybridkv+swa0.25`
runs; 1 otherwise), bytes and score relative to the full f16 cache,
its interval and n; and where they come from (the eval's commands, model, date, n).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from edgekv.eval.engine import split_swa
from edgekv.eval.frontier import front, points
from edgekv.eval.runner import CONFIG, load_records
from edgekv.kv_memory import TABLE


def build_table(run_dir: Path, task: str = "retrieval", regime: str = "after") -> dict:
    pts = [p for p in points(load_records(run_dir)) if p.task == task and p.regime == regime]
    if not pts:
        raise SystemExit(f"no points for task {task!r}, regime {regime!r} in {run_dir} (records with kv_bytes?)")
    on_front = front(pts)
    cfg = json.loads((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).exists() else {}
    cmd = run_dir / "commands.txt"
    # as typed; `python -m edgekv.cli.main` recorded itself as main.py
    commands = [re.sub(r"^main\.py ", "edgekv ", ln.split("  ", 1)[-1]) for ln in cmd.read_text().splitlines()] \
        if cmd.exists() else []
    return {
        "source": {"run": str(run_dir), "command": commands[0] if commands else "?", "commands": commands,
                   "model": Path(cfg.get("grid", {}).get("model", "?")).name, "task": task, "regime": regime,
                   "n": min(p.n for p in pts), "date": time.strftime("%Y-%m-%d"),
                   "media": bool(cfg.get("grid", {}).get("media")),
                   "flash_attn": cfg.get("grid", {}).get("flash_attn", "off")},
        "points": [{"cache_type": p.cache_type, "budget": p.budget, "method": split_swa(p.method)[0],
                    "swa_budget": split_swa(p.method)[1],
                    "ratio": round(p.bytes_ratio, 4), "score": round(p.relative, 4),
                    "ci": [round(c, 4) for c in p.ci] if p.ci else None, "n": p.n, "front": p in on_front}
                   for p in sorted(pts, key=lambda p: p.bytes_ratio) if p.relative is not None],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an `edgekv eval --cache-types ...` --out folder")
    ap.add_argument("--task", default="retrieval", help="task of the front (default: every needle task pooled)")
    ap.add_argument("--regime", default="after")
    ap.add_argument("-o", "--out", type=Path, default=TABLE)
    a = ap.parse_args()
    table = build_table(a.run, a.task, a.regime)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"{a.out}: {len(table['points'])} points from {a.run} (n={table['source']['n']})")
    for p in table["points"]:
        print(f"  {'*' if p['front'] else ' '} {p['cache_type']:>10} {p['method']:>9} {p['budget']:<5g} "
              f"swa {p['swa_budget']:<5g} "
              f"bytes {p['ratio']:.3f}  score {p['score']:.2f}")


if __name__ == "__main__":
    main()
