"""Peak memory: a full-cache run against a run whose context is sized for the budget.

Each run is its own subprocess (`python -m edgekv.eval.memory ...`), so its peak RSS is honest: the child
reports `ru_maxrss` (the kernel's high-water mark) and the parent polls the child with psutil as a
cross-check. Both runs read the same real-text passkey prompt and answer its question:

- full:   n_ctx = prompt + answer; the context is prefilled in n_batch chunks, nothing compacted.
- budget: n_ctx = budget x context + one chunk + the protected cells + answer; the context is prefilled
          in chunks of `chunk` tokens and compacted after each chunk (each chunk keeps `budget` of its
          cells), so the cache never holds more than what the budget needs plus one chunk.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class MemoryRun:
    mode: str
    n_ctx: int
    peak_rss_mb: float          # child's ru_maxrss
    polled_peak_rss_mb: float   # parent's psutil polling (<= the true peak)
    baseline_rss_mb: float      # RSS after model load, before the prompt
    cells: int
    kv_bytes: int
    seconds: float
    prefill_s: float
    compact_s: float
    answer_ok: bool
    generated: str


def budget_n_ctx(n_context: int, n_protected: int, budget: float, chunk: int, window: int, extra: int) -> int:
    """Cells the chunked, compacted run needs at its fullest moment."""
    n_chunks = math.ceil(n_context / chunk)
    kept = math.ceil(budget * n_context) + n_chunks * (window + 1)  # each chunk's window tail stays
    need = kept + chunk + n_protected + extra
    return (need + 255) // 256 * 256


def _child(args: dict) -> dict:
    import resource

    from edgekv.eval.engine import ModelTokenizer
    from edgekv.eval.scoring import retrieval_hit
    from edgekv.eval.tasks import Haystack, TaskSpec, passkey_sample
    from edgekv.runtime import Model, Session

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    t0 = time.perf_counter()
    # The sample is built with a throwaway tokenizer-only load, so both modes see identical tokens.
    probe = Model.load(args["model"], n_ctx=256, n_batch=64, threads=args["threads"], flash_attn="off",
                       capture_queries=False)
    tok = ModelTokenizer(probe)
    sample = passkey_sample(tok, Haystack(tok), TaskSpec(), args["tokens"], 0.5, 0)
    probe.close()
    n_prot = len(sample.prefix) + len(sample.question)
    extra = args["max_new_tokens"] + 8
    if args["mode"] == "full":
        n_ctx = (sample.n_prompt + extra + 255) // 256 * 256
    else:
        n_ctx = budget_n_ctx(len(sample.context), n_prot, args["budget"], args["chunk"], args["window"], extra)
    model = Model.load(args["model"], n_ctx=n_ctx, n_batch=args["n_batch"], threads=args["threads"],
                       flash_attn="off")
    base_rss = rss_mb()
    s = Session(model, method=args["method"], budget=args["budget"], window=args["window"], auto_compact=False)
    t1 = time.perf_counter()
    s.append_tokens(list(sample.prefix))
    compact_s = 0.0
    ctx = list(sample.context)
    if args["mode"] == "full":
        s.append_tokens(ctx, compressible=True)
    else:
        for i in range(0, len(ctx), args["chunk"]):
            s.append_tokens(ctx[i:i + args["chunk"]], compressible=True)
            if i + args["chunk"] < len(ctx):
                r = s.compact()
                compact_s += r.seconds if r else 0.0
    s.append_tokens(list(sample.question))
    if args["mode"] != "full":
        r = s.compact()
        compact_s += r.seconds if r else 0.0
    prefill_s = time.perf_counter() - t1 - compact_s
    text = "".join(r.text for r in s.generate(max_tokens=args["max_new_tokens"]))
    out = {"mode": args["mode"], "n_ctx": model.n_ctx, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "baseline_rss_mb": base_rss, "cells": s.n_cells, "kv_bytes": s.kv_bytes(),
           "seconds": time.perf_counter() - t0, "prefill_s": prefill_s, "compact_s": compact_s,
           "answer_ok": retrieval_hit(text, sample.answer), "generated": text, "n_prompt": sample.n_prompt}
    s.close()
    model.close()
    return out


def run_polled(cmd: list[str], env: dict | None = None, poll_s: float = 0.02) -> tuple[dict, float]:
    """Run a measuring child (it prints one JSON line last) while polling its RSS: (its JSON, the largest
    RSS seen in MiB). A child that fails raises RuntimeError with the end of its stderr."""
    import psutil

    env = dict(os.environ if env is None else env, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    polled = 0.0
    while proc.poll() is None:
        try:
            polled = max(polled, ps.memory_info().rss / 2**20)
        except psutil.Error:
            break
        time.sleep(poll_s)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"failed (exit {proc.returncode}):\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), polled


def measure(mode: str, model: str, tokens: int, *, budget: float = 0.1, method: str = "snapkv", chunk: int = 1024,
            window: int = 32, threads: int = 2, n_batch: int = 512, max_new_tokens: int = 8,
            poll_s: float = 0.02) -> MemoryRun:
    """Run one mode in a fresh subprocess and return its figures."""
    args = dict(mode=mode, model=str(model), tokens=tokens, budget=budget, method=method, chunk=chunk,
                window=window, threads=threads, n_batch=n_batch, max_new_tokens=max_new_tokens)
    try:
        res, polled = run_polled([sys.executable, "-m", "edgekv.eval.memory", json.dumps(args)], poll_s=poll_s)
    except RuntimeError as e:
        from edgekv.errors import EdgeKVError

        raise EdgeKVError(f"memory run '{mode}' {e}") from None
    res.pop("n_prompt", None)
    return MemoryRun(polled_peak_rss_mb=polled, **res)


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
