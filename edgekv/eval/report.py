"""Records -> results.csv, summary.json and results.md (tables). Pure python, no model needed."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Iterable

from edgekv.eval.runner import CONFIG, FULL, iter_errors, load_records

CSV_FIELDS = ["task", "length", "depth", "index", "method", "budget", "score", "kl", "kl_max", "top1",
              "nll", "target_acc", "generated", "answer", "cells_before", "cells_after", "bytes_before",
              "bytes_after", "compact_s", "prefill_s", "run_s", "n_prompt", "n_context", "sample", "cache_type",
              "kv_bytes", "kv_bytes_full_f16"]


def by_cache_type(records: Iterable[dict]) -> list[dict]:
    """Records of a quantized cache as methods of their own ('hybridkv[q8_0]', 'full[q4_0]' = that cache
    type alone), so that the tables below compare them with the f16 `full` reference on the same samples."""
    out = []
    for r in records:
        ct = r.get("cache_type") or "f16"
        out.append(r if ct == "f16" else {**r, "method": f"{r['method']}[{ct}]"})
    return out


def write_csv(records: Iterable[dict], path: Path) -> None:
    rows = sorted(records, key=_order)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def _order(r: dict):
    return (r["task"], r["length"], r["method"] != FULL, r["method"], -r["budget"], r["sample"])


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return mean(xs) if xs else None


RETRIEVAL_TASKS = ("passkey", "kv", "word", "pair")
POOLED = "retrieval"   # every needle task pooled: the headline cell with the most samples


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion k / n."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (task, length | 'all', method, budget): mean score, its ratio to the full cache on
    the same samples, and for continuation KL / top-1. Lengths are also pooled ('all'), and the needle
    tasks are also pooled as task 'retrieval'. Retrieval rows carry n and a 95 % Wilson interval."""
    full = {r["sample"]: r for r in records if r["method"] == FULL}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        for length in (r["length"], "all"):
            groups[(r["task"], length, r["method"], r["budget"])].append(r)
            if r["task"] in RETRIEVAL_TASKS:
                groups[(POOLED, length, r["method"], r["budget"])].append(r)
    rows = []
    for (task, length, method, budget), rs in groups.items():
        paired = [r for r in rs if r["sample"] in full]
        score = _mean(r.get("score") for r in rs)
        ref = _mean(full[r["sample"]].get("score") for r in paired)
        own = _mean(r.get("score") for r in paired)
        rows.append({
            "task": task, "length": length, "method": method, "budget": budget, "n": len(rs),
            "score": score,
            "full_score": ref,
            "relative": (own / ref) if (ref and own is not None) else None,
            "kl": _mean(r.get("kl") for r in rs),
            "top1": _mean(r.get("top1") for r in rs),
            "nll": _mean(r.get("nll") for r in rs),
            "cells_before": _mean(r.get("cells_before") for r in rs),
            "cells_after": _mean(r.get("cells_after") for r in rs),
            "bytes_before": _mean(r.get("bytes_before") for r in rs),
            "bytes_after": _mean(r.get("bytes_after") for r in rs),
            "compact_s": _mean(r.get("compact_s") for r in rs),
            "prefill_s": _mean(r.get("prefill_s") for r in rs),
            "ci": (wilson(sum(r.get("score") or 0 for r in rs), len(rs))
                   if task in RETRIEVAL_TASKS + (POOLED,) else None),
        })
    rows.sort(key=lambda r: (r["task"], str(r["length"]) if r["length"] == "all" else f"{r['length']:08d}",
                             r["method"] != FULL, r["method"], -r["budget"]))
    return rows


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _retrieval_cell(r: dict) -> str:
    ci = r.get("ci")
    iv = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{_fmt(r['score'])}{iv} ({_fmt(r['relative'])}) n={r['n']}"


def _fmt(x, spec=".2f", none="–") -> str:
    return none if x is None else format(x, spec)


def _budget_table(by: dict, task: str, methods, budgets, cell) -> str:
    """One row per method, one column per budget, `cell(record)` in each (a dash where none)."""
    rows = [[m] + ["–" if by.get((task, "all", m, b)) is None else cell(by[(task, "all", m, b)]) for b in budgets]
            for m in methods]
    return md_table(["method"] + [f"budget {b:g}" for b in budgets], rows)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown(records: list[dict], config: dict | None = None, errors: list[dict] | None = None,
             title: str = "edgekv eval", commands: list[str] | None = None) -> str:
    agg = aggregate(records)
    by = {(r["task"], r["length"], r["method"], r["budget"]): r for r in agg}
    order = ("passkey", "kv", "word", "pair", "continuation")
    tasks = sorted({r["task"] for r in records}, key=lambda t: order.index(t) if t in order else 9)
    if len([t for t in tasks if t in RETRIEVAL_TASKS]) > 1:
        tasks = [POOLED] + tasks
    lengths = sorted({r["length"] for r in records})
    methods = sorted({r["method"] for r in records if r["method"] != FULL})
    budgets = sorted({r["budget"] for r in records if r["method"] != FULL}, reverse=True)
    parts = [f"# {title}", ""]
    if config:
        g = config.get("grid", {})
        parts.append(f"Model `{Path(g.get('model', '?')).name}`, window {g.get('window')}, "
                     f"{g.get('max_new_tokens')} greedy tokens per answer, Python {config.get('python')}, "
                     f"started {config.get('started')}.")
        parts.append("")
    if commands:
        parts += ["Commands (every invocation; later ones resumed the run):", "", "```"] + commands + ["```", ""]

    parts += ["## Full-cache baseline", "",
              "Accuracy of the uncompressed cache (retrieval: greedy answer contains the key; "
              "continuation: top-1 agreement with itself = 1 by definition, NLL of the real text).", ""]
    rows = []
    for t in tasks:
        cells = []
        for L in lengths:
            r = by.get((t, L, FULL, 1.0))
            if r is None:
                cells.append("–")
            elif t == "continuation":
                cells.append(f"nll {_fmt(r['nll'])} (n={r['n']})")
            else:
                cells.append(f"{_fmt(r['score'])} (n={r['n']})")
        rows.append([t] + cells)
    parts += [md_table(["task"] + [f"{L} tok" for L in lengths], rows), ""]

    for t in tasks:
        if t == "continuation":
            parts += ["## continuation: top-1 agreement / KL(full || compressed) in nats, all lengths", "",
                      _budget_table(by, t, methods, budgets,
                                    lambda r: f"{_fmt(r['top1'])} / {_fmt(r['kl'], '.3f')}"), ""]
        else:
            title = "every needle task pooled" if t == POOLED else t
            parts += [f"## {title}: accuracy (relative to full cache), all lengths", "",
                      "Cells: mean accuracy over samples [95 % Wilson interval] (relative = method accuracy / "
                      "full-cache accuracy on the same samples), n samples.", "",
                      _budget_table(by, t, methods, budgets, _retrieval_cell), ""]
        if len(lengths) > 1:
            parts += [f"### {t} by length ({'top-1 agreement' if t == 'continuation' else 'accuracy'})", ""]
            rows = []
            for m in methods:
                for b in budgets:
                    key = "top1" if t == "continuation" else "score"
                    cells = [_fmt((by.get((t, L, m, b)) or {}).get(key)) for L in lengths]
                    rows.append([m, f"{b:g}"] + cells)
            parts += [md_table(["method", "budget"] + [f"{L} tok" for L in lengths], rows), ""]

    parts += ["## Cache size and compaction time (mean over samples)", ""]
    rows = []
    for L in lengths:
        for b in budgets:
            rs = [r for r in records if r["length"] == L and r["budget"] == b and r["method"] != FULL
                  and r.get("cells_after") is not None and (r.get("cache_type") or "f16") == "f16"]
            if not rs:
                continue
            bb = _mean(r.get("block_bytes_before") for r in rs)
            ba = _mean(r.get("block_bytes_after") for r in rs)
            rows.append([str(L), f"{b:g}", _fmt(_mean(r["cells_before"] for r in rs), ".0f"),
                         _fmt(_mean(r["cells_after"] for r in rs), ".0f"),
                         _fmt(None if bb is None else bb / 2**20, ".2f"),
                         _fmt(None if ba is None else ba / 2**20, ".2f"),
                         _fmt(_mean(r["bytes_before"] for r in rs) / 2**20, ".2f"),
                         _fmt(_mean(r["bytes_after"] for r in rs) / 2**20, ".2f"),
                         _fmt(_mean(r["prefill_s"] for r in rs), ".2f"),
                         _fmt(_mean(r["compact_s"] for r in rs), ".3f"),
                         _fmt(100 * _mean(r["compact_s"] / r["prefill_s"] for r in rs if r.get("prefill_s")), ".1f")])
    parts += ["Cells: the compressible (global-attention) cache block. Block MiB: those cells' K+V; KV MiB: the "
              "whole sequence state (with the sliding-window block, which compaction leaves as it is). "
              "Prefill: the whole prompt, measured once per sample. f16 cache only (every cache type's bytes: "
              "frontier.md).", "",
              md_table(["length", "budget", "cells before", "cells after", "block MiB before", "block MiB after",
                      "KV MiB before", "KV MiB after", "prefill s", "compact s", "compact % of prefill"], rows), ""]
    rows = []
    for m in methods:
        cells = []
        for b in budgets:
            rs = [r for r in records if r["method"] == m and r["budget"] == b and r.get("cells_after") is not None
                  and r.get("n_context")]
            cells.append("–" if not rs else _fmt(_mean(
                (r["cells_after"] - (r["cells_before"] - r["n_context"])) / r["n_context"] for r in rs), ".3f"))
        rows.append([m] + cells)
    if rows:
        parts += ["Context cells actually kept, as a fraction of the context (mean): a method with per-layer or "
                  "per-head budgets (PyramidKV, AdaKV, ...) packs max(per-slot budget) cells, which can exceed "
                  "the nominal budget.", "",
                  md_table(["method"] + [f"budget {b:g}" for b in budgets], rows), ""]
    per_method = []
    for m in methods:
        rs = [r for r in records if r["method"] == m and r.get("compact_s") is not None]
        if rs:
            probe = [r for r in rs if r.get("probe_s") is not None]
            per_method.append([m, _fmt(_mean(r["compact_s"] for r in rs), ".3f"),
                               _fmt(100 * _mean(r["compact_s"] / r["prefill_s"] for r in rs if r.get("prefill_s")), ".1f"),
                               _fmt(_pct(_mean(r["compact_s"] / r["media_prefill_s"] for r in rs
                                               if r.get("media_prefill_s"))), ".1f"),
                               _fmt(_mean(r["probe_s"] + r.get("probe_remove_s", 0) for r in probe), ".3f")])
    if per_method:
        parts += ["Compaction time by method (mean over all lengths and budgets). With a probe (regimes before/known) "
                  "compact s includes the probe's decode and removal (probe s); % of the document prefill = "
                  "compact s / the prefill of the compressible span (the images on --media).", "",
                  md_table(["method", "compact s", "% of prefill", "% of document prefill", "probe s"], per_method), ""]
    if errors:
        parts += ["## Errors", "", "Runs that raised (recorded, not scored):", ""]
        seen = {}
        for e in errors:
            seen.setdefault((e["method"], e["error"].splitlines()[0][:160]), 0)
            seen[(e["method"], e["error"].splitlines()[0][:160])] += 1
        parts += [f"- `{m}` x{n}: {msg}" for (m, msg), n in sorted(seen.items())] + [""]
    return "\n".join(parts)


def write_reports(out_dir: str | os.PathLike, plots: bool = True, title: str = "edgekv eval") -> dict:
    """Write results.csv, summary.json, results.md (and plots) from records.jsonl. Returns paths."""
    out = Path(out_dir)
    records = by_cache_type(load_records(out))
    done = {r["key"] for r in records}
    errors = [e for e in iter_errors(out) if e["key"] not in done]
    cfg_path = out / CONFIG
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    paths = {"csv": out / "results.csv", "json": out / "summary.json", "md": out / "results.md"}
    write_csv(records, paths["csv"])
    paths["json"].write_text(json.dumps({"config": config, "aggregate": aggregate(records),
                                         "n_records": len(records), "n_errors": len(errors),
                                         "errors": errors[:50]}, indent=2, default=str))
    cmd_path = out / "commands.txt"
    commands = cmd_path.read_text().splitlines() if cmd_path.exists() else None
    paths["md"].write_text(markdown(records, config, errors, title=title, commands=commands))
    if plots and records:
        from edgekv.eval.plots import plot_scores

        paths.update(plot_scores(aggregate(records), out))
    if any(r.get("kv_bytes") for r in records):   # the memory axis, once records carry their bytes
        from edgekv.eval.frontier import write_frontier

        paths.update(write_frontier(load_records(out), out, plots=plots, config=config))
    return paths
