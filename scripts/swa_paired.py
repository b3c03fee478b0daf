"""Thinning the sliding-window block, paired: every `hybridkv+swaF` point of an `edgekv eval` run against the
same method, budget and cache type with the block whole, on the same samples (docs/memory.md).

    python scripts/swa_paired.py results/frontier/media-1k2k [--task retrieval] > .../swa_paired.md

Prints a markdown table: the accuracy with the block whole and thinned, the difference with a paired
bootstrap 95 % interval (samples resampled, the pairs kept together), and both byte ratios.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgekv.eval.engine import split_swa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import by_point, compare  # noqa: E402  (scripts/paired.py, beside this one)


def rows(run: Path, task: str = "retrieval") -> list[str]:
    # (method, the window block's share, budget, cache type) -> sample -> record
    by = {(*split_swa(name), budget, ct): recs for (name, budget, ct), recs in by_point(run, task).items()}
    out = ["| point | n | whole block | thinned | difference [95 % CI] | bytes whole -> thinned |",
           "|---|---|---|---|---|---|"]
    for (method, swa, budget, ct), thin in sorted(by.items(), key=lambda kv: (kv[0][3], kv[0][2], -kv[0][1])):
        whole = by.get((method, 1.0, budget, ct))
        if swa >= 1.0 or not whole:
            continue
        c = compare(thin, whole)
        if c is not None:
            out.append(f"| {method} {budget:g}, window {swa:g}, {ct} | {c.n} | {c.b:.2f} | {c.a:.2f} | "
                       f"{c.diff:+.2f} [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}] | {c.ratio_b:.3f} -> {c.ratio_a:.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--task", default="retrieval", help="a task, or retrieval: every needle task pooled")
    a = ap.parse_args()
    print("\n".join(rows(a.run, a.task)))


if __name__ == "__main__":
    main()
