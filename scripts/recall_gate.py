#!/usr/bin/env python
"""What a `recall_min_share` gate would do, read off two `edgekv eval --tasks second` runs on the same samples:
one with `--recall ram` (every record carries `recall_share`, the largest share of a KV head's window
attention that the re-selection brought back) and one with `--recall off`.

    python scripts/recall_gate.py results/recall/second-text-ram-shares results/recall/second-text \
        [--gates 0.05,0.1,0.2,0.3,0.5]

Only the question-after regime is read: there the first compaction has no store to choose from, so a gated
re-selection that keeps the context leaves exactly the context recall off has, and its answer is the
recall-off record's. Per budget: the shares, those of the answers recall won, and the accuracy and the
number of re-selections skipped at each gate. (`edgekv eval --recall ram-gN` measures a gate directly.)
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def records(folder: Path) -> dict[str, dict]:
    out = {}
    for line in (folder / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "score" in r:
            out[f"{r['key']}|{r['regime']}"] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ram", type=Path)
    ap.add_argument("off", type=Path)
    ap.add_argument("--gates", default="0.05,0.1,0.2,0.3,0.5")
    a = ap.parse_args()
    ram, off = records(a.ram), records(a.off)
    cells = defaultdict(list)    # budget -> (share, ram hit, off hit)
    for k, r in ram.items():
        if r["method"] != "full" and r["regime"] == "after" and k in off:
            cells[r["budget"]].append((float(r.get("recall_share") or 0.0), r["score"], off[k]["score"]))
    gates = [float(g) for g in a.gates.split(",")]
    print(f"| budget | n | recall off | recall | shares where recall won | "
          + " | ".join(f"gate {g:g}: accuracy (skipped)" for g in gates) + " |")
    print("|---|---|---|---|---|" + "---|" * len(gates))
    for b, rows in sorted(cells.items(), reverse=True):
        n = len(rows)
        won = sorted(round(s, 2) for s, h, o in rows if h > o)
        cols = []
        for g in gates:
            acc = sum(h if s >= g else o for s, h, o in rows) / n
            cols.append(f"{acc:.2f} ({sum(s < g for s, _, _ in rows)}/{n})")
        print(f"| {b:g} | {n} | {sum(o for *_, o in rows) / n:.2f} | {sum(h for _, h, _ in rows) / n:.2f} | "
              f"{min(won) if won else '-'} .. {max(won) if won else '-'} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
