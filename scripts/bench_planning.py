"""Planning-time benchmark: every registered method on a 7B-shaped cache (numpy only, no model).

Shape of Qwen2.5-VL-7B: 28 layers, 4 KV heads, 28 query heads, head dim 128; 8192 media tokens followed
by a 32-token text window whose queries were captured. K/V/Q are random, with a per-head query
temperature so some heads attend sharply and others broadly (HybridKV then sees both head types).

    python scripts/bench_planning.py                      # budget 10 % of the media
    python scripts/bench_planning.py --budget 0.2 --budget 819 --repeats 3

"warm" = plan() on a view whose window attention is already computed (the runtime computes it once
per compaction and every attention method shares it); "cold" = plan() on a fresh view, so the window
attention is included: what one compaction costs. The window pass and merged_kv (FlowMM's weighted
means, applied by the packer) are printed as their own rows. Planning uses $EDGEKV_THREADS threads
(default: every CPU).
Wall seconds are the target; CPU seconds (all threads of this process) show how much of the wall
time was this process working, which matters on a shared machine (load average printed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from edgekv.methods import METHODS, KVView, Span, get_method, resolve_budget
from edgekv.methods.merge import merged_kv


def make_view(layers: int, kv_heads: int, heads: int, head_dim: int, media: int, window: int,
              seed: int = 0) -> KVView:
    rng = np.random.default_rng(seed)
    T = media + window
    keys = rng.standard_normal((layers, kv_heads, T, head_dim), dtype=np.float32)
    values = rng.standard_normal((layers, kv_heads, T, head_dim), dtype=np.float32)
    queries = rng.standard_normal((layers, heads, window, head_dim), dtype=np.float32)
    queries *= rng.uniform(0.5, 4.0, size=(layers, heads, 1, 1)).astype(np.float32)  # sharp/broad
    candidates = np.zeros(T, dtype=bool)
    candidates[:media] = True
    spans = (Span(0, media, "media", 0), Span(media, T, "text"))
    return KVView(keys, values, candidates, spans=spans, queries=queries)


def fresh(view: KVView) -> KVView:
    return KVView(view.keys, view.values, view.candidates, spans=view.spans, queries=view.queries)


def timed(fn, repeats: int):
    """(median wall seconds, median CPU seconds of this process over all its threads, last result)."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", action="append", help="ratio of the media (0.1) or cells (819); repeatable")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--media", type=int, default=8192)
    ap.add_argument("--method", action="append", help="only these methods (default: all registered)")
    ap.add_argument("--no-cold", action="store_true", help="skip the fresh-view (cold) timings")
    ap.add_argument("--target", type=float, default=1.0, help="seconds a plan should stay under (default 1)")
    args = ap.parse_args()

    view = make_view(args.layers, 4, 28, 128, args.media, 32)
    names = args.method or sorted(METHODS)
    print(f"cache: L={args.layers} H_kv=4 H=28 d=128 T={view.n_tokens} ({args.media} media + 32 window); "
          f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print()
    print("| method | budget (cells) | warm plan s | warm CPU s | cold plan s | cold CPU s | cells used | nominal mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    t0 = time.perf_counter()
    _ = fresh(view).window_scores  # the first pass in a process also starts the planning threads
    first = time.perf_counter() - t0
    wall, cpu, _ = timed(lambda: fresh(view).window_scores, args.repeats)
    _ = view.window_scores
    print(f"| (window attention pass, once per view; first in process {first:.3f}) | | | | {wall:.3f} | "
          f"{cpu:.3f} | | |", flush=True)
    over: list[str] = []  # (method, budget) whose plan, window attention included, took >= the target
    for raw in args.budget or ["0.1"]:
        budget = resolve_budget(raw, view.n_candidates)
        for name in names:
            method = get_method(name)
            wall, cpu, plan = timed(lambda: method.plan(view, budget), args.repeats)
            resolved = method.resolve(view) if hasattr(method, "resolve") else method  # auto
            if resolved.needs_queries and not args.no_cold:
                cold_wall, cold_cpu, _ = timed(lambda: method.plan(fresh(view), budget), args.repeats)
                cold = f"{cold_wall:.3f} | {cold_cpu:.3f}"
            else:
                cold_wall = wall
                cold = "= warm | = warm" if not args.no_cold else " | "
            if cold_wall >= args.target:
                over.append(f"{name} @ {budget} ({cold_wall:.2f} s)")
            print(f"| {name} | {budget} | {wall:.3f} | {cpu:.3f} | {cold} | {plan.n_slots} | "
                  f"{plan.nominal.mean():.1f} |", flush=True)
            if plan.merge_to is not None:
                wall, cpu, _ = timed(lambda: merged_kv(view.keys, view.values, plan), args.repeats)
                print(f"| merged_kv({name}) | {budget} | {wall:.3f} | {cpu:.3f} | | | {plan.n_slots} | |",
                      flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(f"at or over the {args.target:g} s target (cold where it applies): " + (", ".join(over) or "none"))


if __name__ == "__main__":
    main()
