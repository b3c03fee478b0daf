"""The memory axis: score against KV bytes, both relative to the full f16 cache, and the front.

Every (method, budget, cache type) of an `edgekv eval --cache-types` run is one point per task and regime:
x = the compacted context's K+V bytes / the full f16 cache's bytes of the same sample (mean over samples),
y = mean score / the full f16 cache's mean score on the same samples, with n and a paired bootstrap 95 %
interval. The front is the best y at or under each x. Writes frontier.md, frontier.json, frontier.png.
Pure python (matplotlib for the plot), no model needed.
"""
from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

from edgekv.eval.report import POOLED, RETRIEVAL_TASKS, md_table
from edgekv.eval.runner import FULL

F16 = "f16"
TARGETS = (0.25, 0.125, 0.0625)    # issue 21: >= 0.95, >= 0.85, >= 0.7 of the f16 score at these sizes
TASK_ORDER = (POOLED,) + RETRIEVAL_TASKS + ("continuation",)


@dataclass
class Point:
    task: str
    regime: str
    method: str          # without the regime suffix; `full` = no eviction
    budget: float
    cache_type: str
    n: int
    bytes_ratio: float   # mean over samples of kv_bytes / kv_bytes_full_f16
    score: float         # mean score (retrieval: accuracy; continuation: top-1 agreement with f16 full)
    full_score: float    # the f16 full cache's mean score on the same samples
    relative: float | None
    ci: tuple[float, float] | None   # paired bootstrap 95 % interval of `relative`
    kv_bytes: float      # mean bytes
    on_front: bool = False

    @property
    def label(self) -> str:
        if self.method == FULL:
            return f"{self.cache_type} alone"
        return f"{self.method} {self.budget:g} on {self.cache_type}"


def _regime(r: dict) -> str:
    return r.get("regime") or (r["method"].partition("@")[2] or "after")


def _ratio_ci(pairs: list[tuple[float, float]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile interval of mean(own) / mean(ref), resampling samples (the pairs stay together)."""
    if len(pairs) < 2:
        return None
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        draw = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        ref = sum(p[1] for p in draw)
        if ref > 0:
            stats.append(sum(p[0] for p in draw) / ref)
    if not stats:
        return None
    stats.sort()
    return stats[int(0.025 * (len(stats) - 1))], stats[int(0.975 * (len(stats) - 1))]


def points(records: list[dict]) -> list[Point]:
    """Every (task, regime, method, budget, cache type) with its paired bytes and score."""
    recs = [r for r in records if r.get("kv_bytes") and r.get("kv_bytes_full_f16") and r.get("score") is not None]
    ref = {r["sample"]: r for r in recs if r["method"] == FULL and (r.get("cache_type") or F16) == F16}
    regimes = sorted({_regime(r) for r in recs if r["method"] != FULL}) or ["after"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in recs:
        if r["sample"] not in ref:
            continue
        tasks = [r["task"]] + ([POOLED] if r["task"] in RETRIEVAL_TASKS else [])
        # no eviction is the same cache in every regime: it is a point of each
        for regime in (regimes if r["method"] == FULL else [_regime(r)]):
            for t in tasks:
                groups[(t, regime, r["method"].partition("@")[0], float(r["budget"]),
                        r.get("cache_type") or F16)].append(r)
    out = []
    for (task, regime, method, budget, ct), rs in groups.items():
        pairs = [(float(r["score"]), float(ref[r["sample"]]["score"])) for r in rs]
        if task == "continuation":   # top-1 agreement with the f16 full cache: already relative (full = 1)
            pairs = [(s, 1.0) for s, _ in pairs]
        full_score = mean(p[1] for p in pairs)
        score = mean(p[0] for p in pairs)
        out.append(Point(task, regime, method, budget, ct, len(rs),
                         mean(r["kv_bytes"] / r["kv_bytes_full_f16"] for r in rs), score, full_score,
                         score / full_score if full_score else None, _ratio_ci(pairs),
                         mean(r["kv_bytes"] for r in rs)))
    mark_front(out)
    return sorted(out, key=_order)


def _order(p: Point):
    t = TASK_ORDER.index(p.task) if p.task in TASK_ORDER else 99
    return (t, p.task, p.regime, p.bytes_ratio, -(p.relative or 0))


def front(pts: list[Point]) -> list[Point]:
    """The points that set a new best relative score going up in bytes (ties: the smaller one): the best
    at or under each size is the last front point at or under it."""
    best, out = None, []
    for p in sorted(pts, key=lambda p: (p.bytes_ratio, -(p.relative or 0))):
        if p.relative is None:
            continue
        if best is None or p.relative > best:
            out.append(p)
            best = p.relative
    return out


def best_at(pts: list[Point], ratio: float) -> Point | None:
    """The best point at or under `ratio` of the f16 bytes (None: none is that small)."""
    fits = [p for p in pts if p.relative is not None and p.bytes_ratio <= ratio + 1e-9]
    return max(fits, key=lambda p: (p.relative, -p.bytes_ratio)) if fits else None


def mark_front(pts: list[Point]) -> None:
    by = defaultdict(list)
    for p in pts:
        by[(p.task, p.regime)].append(p)
    for group in by.values():
        for p in front(group):
            p.on_front = True


def _ci(p: Point) -> str:
    return f"[{p.ci[0]:.2f}, {p.ci[1]:.2f}]" if p.ci else "–"


def _rel(p: Point | None) -> str:
    return "–" if p is None or p.relative is None else f"{p.relative:.2f}"


def markdown(pts: list[Point], config: dict | None = None, commands: list[str] | None = None) -> str:
    parts = ["# edgekv eval: quality per byte", ""]
    if config:
        g = config.get("grid", {})
        types = ", ".join(g.get("cache_types") or ["f16"])
        parts += [f"Model `{Path(g.get('model', '?')).name}`, cache types {types}, "
                  f"flash attention {g.get('flash_attn', 'off')}, media {bool(g.get('media'))}.", ""]
    if commands:
        parts += ["Commands:", "", "```"] + commands + ["```", ""]
    parts += ["x = K+V bytes of the context the answer is computed from (every cache block, as llama.cpp's state "
              "holds them) / those of the full f16 cache of the same sample, mean over samples. Relative = score / "
              "the full f16 cache's score on the same samples, with a paired bootstrap 95 % interval. "
              "`q4_0 alone` = that cache type without eviction. Front (*): the best score at or under each size.", ""]
    groups = defaultdict(list)
    for p in pts:
        groups[(p.task, p.regime)].append(p)
    rows = []
    for (task, regime), g in groups.items():
        rows.append([task, regime] + [_best_cell(best_at(g, t)) for t in TARGETS])
    parts += ["## Best at or under each size (the issue's targets: 0.95 at 25 %, 0.85 at 12.5 %, 0.7 at 6 %)", "",
              md_table(["task", "regime"] + [f"<= {100 * t:g} % of f16 bytes" for t in TARGETS], rows), ""]
    for (task, regime), g in groups.items():
        parts += [f"## {task}, question {regime} the document" if regime != "known" else
                  f"## {task}, question known before the document", ""]
        parts += [md_table(["front", "point", "bytes / f16", "MiB", "score", "relative", "95 % CI", "n"],
                         [["*" if p.on_front else "", p.label, f"{p.bytes_ratio:.3f}", f"{p.kv_bytes / 2**20:.2f}",
                           f"{p.score:.2f}", _rel(p), _ci(p), str(p.n)] for p in g]), ""]
    return "\n".join(parts)


def _best_cell(p: Point | None) -> str:
    if p is None:
        return "none that small"
    return f"{_rel(p)} {_ci(p)} ({p.label}, {p.bytes_ratio:.2f}, n={p.n})"


def plot(pts: list[Point], path: Path) -> Path:
    from edgekv.eval.plots import MARKERS, pyplot

    plt = pyplot()
    tasks = [t for t in TASK_ORDER if any(p.task == t for p in pts)]
    regimes = sorted({p.regime for p in pts})
    fig, axes = plt.subplots(len(regimes), len(tasks), figsize=(4.6 * len(tasks), 3.9 * len(regimes)),
                             squeeze=False)
    cts = sorted({p.cache_type for p in pts}, key=lambda c: (c != F16, c))
    methods = sorted({p.method for p in pts})
    cmap = plt.get_cmap("tab10")
    for i, regime in enumerate(regimes):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            g = [p for p in pts if p.task == task and p.regime == regime and p.relative is not None]
            for p in g:
                ax.scatter(p.bytes_ratio, p.relative, color=cmap(cts.index(p.cache_type) % 10),
                           marker=MARKERS[methods.index(p.method) % len(MARKERS)], s=22, zorder=3)
                if p.ci:
                    ax.plot([p.bytes_ratio] * 2, p.ci, color=cmap(cts.index(p.cache_type) % 10), lw=0.6, alpha=0.5)
            f = front(g)
            if f:   # a step: the best at or under each size
                xs, ys = [], []
                for k, p in enumerate(f):
                    xs += [p.bytes_ratio, f[k + 1].bytes_ratio if k + 1 < len(f) else 1.05]
                    ys += [p.relative, p.relative]
                ax.plot(xs, ys, color="k", lw=1.2, label="front")
            for t in TARGETS:
                ax.axvline(t, color="0.7", lw=0.6, ls=":")
            ax.set_xlim(0, 1.05)
            ax.set_ylim(-0.03, 1.15)
            ax.set_xlabel("KV bytes / full f16 cache")
            ax.set_ylabel("score / full f16 cache")
            ax.set_title(f"{task}, {regime}")
            ax.grid(alpha=0.3)
    for c in cts:
        axes[0][0].scatter([], [], color=cmap(cts.index(c) % 10), marker="o", label=c)
    for m in methods:
        axes[0][0].scatter([], [], color="0.4", marker=MARKERS[methods.index(m) % len(MARKERS)],
                           label="no eviction" if m == FULL else m)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / (4.6 * len(tasks)), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_frontier(records: list[dict], out_dir: str | os.PathLike, plots: bool = True,
                   config: dict | None = None) -> dict:
    """frontier.md, frontier.json (every point) and frontier.png in `out_dir`. Returns their paths."""
    out = Path(out_dir)
    pts = points(records)
    cmd_path = out / "commands.txt"
    commands = cmd_path.read_text().splitlines() if cmd_path.exists() else None
    paths = {"frontier_md": out / "frontier.md", "frontier_json": out / "frontier.json"}
    paths["frontier_md"].write_text(markdown(pts, config, commands))
    paths["frontier_json"].write_text(json.dumps({"config": config, "commands": commands,
                                                  "points": [asdict(p) for p in pts]}, indent=2))
    if plots and pts:
        paths["frontier_png"] = plot(pts, out / "frontier.png")
    return paths
