"""Two points of an `edgekv eval` run, paired on the same samples: `A` against `B` for every cache type.

    python scripts/paired.py results/frontier/allocator "mixkv-pyramidkv 0.125" "hybridkv 0.25" [--task retrieval]

A point is `method budget` (the method as the eval names it: `hybridkv+swa0.1`, `full 1`). Prints a markdown
table row per cache type holding both: n, the accuracy of each, A - B with a paired bootstrap 95 % interval
(samples resampled), and both byte ratios to the full f16 cache.
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from edgekv.eval.report import RETRIEVAL_TASKS
from edgekv.eval.runner import load_records


def diff_ci(pairs: list[tuple[float, float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of mean(a - b) over resampled samples (the pairs kept together)."""
    rng = random.Random(seed)
    stats = sorted(sum(a - b for a, b in (pairs[rng.randrange(len(pairs))] for _ in pairs)) / len(pairs)
                   for _ in range(n_boot))
    return stats[int(0.025 * (n_boot - 1))], stats[int(0.975 * (n_boot - 1))]


@dataclass(frozen=True)
class Compared:
    """Two points on the samples both hold: n, each accuracy, a - b with its interval, each byte ratio."""

    n: int
    a: float
    b: float
    diff: float
    ci: tuple[float, float]
    ratio_a: float
    ratio_b: float


def compare(a: dict, b: dict) -> Compared | None:
    """a, b: sample -> eval record of one point each. None when they share fewer than two samples."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    pairs = [(float(a[s]["score"]), float(b[s]["score"])) for s in common]
    n = len(pairs)
    ra, rb = (sum(d[s]["kv_bytes"] / d[s]["kv_bytes_full_f16"] for s in common) / n for d in (a, b))
    return Compared(n, sum(p[0] for p in pairs) / n, sum(p[1] for p in pairs) / n,
                    sum(x - y for x, y in pairs) / n, diff_ci(pairs), ra, rb)


def parse_point(text: str) -> tuple[str, float]:
    method, _, budget = text.strip().rpartition(" ")
    if not method:
        raise SystemExit(f"{text!r}: write a point as `method budget`, e.g. `hybridkv 0.25`")
    return method, float(budget)


def by_point(run: Path, task: str = "retrieval", regime: str | None = None) -> dict[tuple, dict[str, dict]]:
    """(method as the eval names it, without its regime; budget; cache type) -> sample -> scored record with
    its bytes, for `task` (retrieval: every needle task) and, when given, one regime."""
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in load_records(run):
        if r.get("score") is None or not r.get("kv_bytes_full_f16"):
            continue
        if regime is not None and r.get("regime", "after") != regime:
            continue
        if (r["task"] in RETRIEVAL_TASKS) if task == "retrieval" else r["task"] == task:
            by[(r["method"].partition("@")[0], float(r["budget"]), r.get("cache_type") or "f16")][r["sample"]] = r
    return by


def rows(run: Path, a: str, b: str, task: str = "retrieval") -> list[str]:
    pa, pb = parse_point(a), parse_point(b)
    by = by_point(run, task, regime="after")
    out = [f"| cache | n | {a} | {b} | A - B [95 % CI] | bytes / f16: A, B |", "|---|---|---|---|---|---|"]
    for ct in sorted({k[2] for k in by}):
        c = compare(by.get((*pa, ct)) or {}, by.get((*pb, ct)) or {})
        if c is not None:
            out.append(f"| {ct} | {c.n} | {c.a:.2f} | {c.b:.2f} | {c.diff:+.2f} [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}] | "
                       f"{c.ratio_a:.3f}, {c.ratio_b:.3f} |")
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
