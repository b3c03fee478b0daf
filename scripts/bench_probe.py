"""Probe-window cost: scoring a probe window at the 7B shape of bench_planning.py (numpy, no model),
and the probe's decode as a share of the media prefill (FLOP ratio at that shape).

    python scripts/bench_probe.py --probe-tokens 18 --budget 0.25 --budget 0.1

The probe decodes `probe_tokens` tokens after `media` media tokens: its dense work is probe/media of the
media prefill's dense work, its attention reads the whole cache once per probe token (counted below).
Scoring = the plan of the query-aware method on a fresh view (the window pass included), plus the
removal (seq_rm, or on iSWA models a state round trip, measured on Gemma: docs/probe-windows.md, "Exact removal").
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench_planning import make_view  # noqa: E402  (scripts/ on sys.path when run as a script)

from edgekv.methods import get_method, resolve_budget


def flops(layers: int, d_model: int, d_ff: int, heads: int, kv_heads: int, head_dim: int, tokens: int,
          context: int) -> float:
    """Forward FLOPs of `tokens` new tokens attending to `context` cached tokens (dense + attention)."""
    qkvo = 2 * d_model * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 2 * 3 * d_model * d_ff
    attn = 2 * 2 * heads * head_dim * context
    return layers * tokens * (qkvo + mlp + attn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", action="append", type=float, help="ratio of the media (repeatable)")
    ap.add_argument("--probe-tokens", type=int, default=18, help="probe length (Gemma: the generic probe is 18)")
    ap.add_argument("--media", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--method", action="append", help="default: hybridkv and expected")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    budgets = args.budget or [0.25, 0.1]
    methods = args.method or ["hybridkv", "expected"]
    # Qwen2.5-VL-7B text shapes (bench_planning.py): 28 layers, d_model 3584, d_ff 18944, 28/4 heads, 128
    shape = dict(layers=args.layers, d_model=3584, d_ff=18944, heads=28, kv_heads=4, head_dim=128)
    prefill = sum(flops(**shape, tokens=512, context=c + 512) for c in range(0, args.media, 512))
    probe = flops(**shape, tokens=args.probe_tokens, context=args.media + args.probe_tokens)
    print(f"7B shape, {args.media} media tokens, probe of {args.probe_tokens} tokens")
    print(f"probe decode / media prefill (FLOPs): {100 * probe / prefill:.2f} %")
    view = make_view(args.layers, 4, 28, 128, args.media, args.probe_tokens)
    for m in methods:
        for b in budgets:
            cells = resolve_budget(b, view.n_candidates)
            walls = []
            for r in range(args.repeats):
                v = make_view(args.layers, 4, 28, 128, args.media, args.probe_tokens, seed=r)
                t0 = time.perf_counter()
                get_method(m).plan(v, cells)
                walls.append(time.perf_counter() - t0)
            print(f"{m:10s} budget {b:g} ({cells} cells): scoring (cold plan) median {statistics.median(walls):.2f} s")


if __name__ == "__main__":
    main()
