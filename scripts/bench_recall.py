#!/usr/bin/env python
"""What recall's re-selection costs a follow-up question, at real text shapes with many media cells.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_recall.py --shapes qwen2-vl-2b,qwen2-7b --media 16384 \
        [--method snapkv] [--budget 0.25] [--threads 2] [--out results/recall/cost]

A synthetic model (random weights, the text shapes of a real VLM; `edgekv.testing.tiny.build_text_model`,
built once into the edgekv models folder) holds a header, then `--media` media cells, then a question.
The media cells' K/V rows are random values of the cache type written through the state blob (the same
bytes a prefill would leave, at a fraction of a 2-core prefill's minutes; the ledger records them as one
media chunk), so every compaction and re-selection below reads, scores and rewrites the cells it would
at those shapes. Per shape and `--recall` mode (off, ram, disk):

1. the first question is prefilled and the cache compacted with it (the question after the media);
2. one answer token; then a follow-up question: its time to first token (TTFT: prefill + the
   re-selection before the first token) against the same follow-up with recall off;
3. the same follow-up asked again: when the chosen set does not change, nothing is rewritten and no
   question token is prefilled again; the scoring still runs (reported as its own number).

Writes recall-cost.{json,md}. Timing on a shared 2-core VM drifts ~10 %: compare within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # Qwen2-1.5B: Qwen2-VL-2B's text model (28 layers, 2 KV heads x 128)
    "qwen2-vl-2b": dict(arch="llama", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, head_dim=128, n_ff=8960,
                        n_vocab=151936, tie_embeddings=True),
    # Qwen2-7B: Qwen2-VL-7B's text model (28 layers, 4 KV heads x 128)
    "qwen2-7b": dict(arch="llama", n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, head_dim=128, n_ff=18944,
                     n_vocab=152064, tie_embeddings=False),
}
Q1 = "\nQuestion: what is in the top left corner of the first picture? Answer:"
Q2 = "\nQuestion: and what colour is the car in the last picture, exactly? Answer:"


def build(shape: str) -> Path:
    from edgekv.eval.gemma import models_dir
    from edgekv.testing.tiny import build_text_model

    d = models_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"synthetic-{shape}-q4_0.gguf"
    if not path.exists():
        build_text_model(path, **SHAPES[shape], weight_type="q4_0", seed=0, n_ctx=32768)
    return path


def inject_media(session, n: int, seed: int = 0) -> None:
    """n media cells with random K/V rows after what the cache holds (see the module docstring)."""
    import numpy as np

    from edgekv.kv.codec import KVBlock, LayerKV, SeqState, state_buffer
    from edgekv.kv.dtypes import from_float
    from edgekv.runtime.cache import PENDING

    c = session.cache
    st = c.parse(c.state_buffer())
    base = st.blocks[0]
    rng = np.random.default_rng(seed)
    layers = []
    for layer in base.layers:
        k = from_float(rng.standard_normal((n, layer.n_embd_k), dtype=np.float32), layer.k_type)
        v = from_float(rng.standard_normal((n, layer.n_embd_v), dtype=np.float32) * 0.1, layer.v_type)
        layers.append(LayerKV(layer.k_type, np.concatenate([layer.k, k]), layer.v_type, np.concatenate([layer.v, v])))
    pos = np.concatenate([base.pos, np.arange(c.n_past, c.n_past + n, dtype=np.int32)])
    block = KVBlock(pos=pos, seq_id=np.zeros(len(pos), np.int32), ext=None, v_trans=base.v_trans, layers=layers)
    if not c.set_state(state_buffer(SeqState(st.seq_id, [block] + st.blocks[1:], st.has_ext))):
        raise SystemExit("llama.cpp refused the synthetic cells")
    c.n_past += n
    c.add_cells(n, PENDING, c.n_media)
    c.n_media += 1
    c.logits, c.logits_after_media = None, True


def first_token_s(session, text: str, compact: bool = False) -> tuple[float, object]:
    """Seconds to the first answer token after `text` (compact: with the question after the media, as
    chat() does; a follow-up re-selects inside generate() when recall is on)."""
    t0 = time.perf_counter()
    session.append_text(text)
    if compact:
        session.compact()
    next(iter(session.generate(max_tokens=1)))
    return time.perf_counter() - t0, (session.reports[-1] if session.reports else None)


def run(shape: str, n_media: int, method: str, budget: float, threads: int, modes: list[str]) -> dict:
    import psutil

    from edgekv.runtime import Model, Session

    path = build(shape)
    out = {"shape": shape, "media_cells": n_media, "method": method, "budget": budget, "modes": {}}
    model = Model.load(str(path), n_ctx=n_media + 512, n_batch=512, threads=threads)
    try:
        for mode in modes:
            from edgekv.eval.recall import session_kwargs

            s = Session(model, method=method, budget=budget, **session_kwargs(mode))
            s.append_text("Pictures follow.")
            inject_media(s, n_media)
            t_q1, r1 = first_token_s(s, Q1, compact=True)
            n_before = s.n_cells
            n_reports = len(s.reports)
            t_follow, r2 = first_token_s(s, Q2)
            r2 = r2 if len(s.reports) > n_reports else None
            rec = {"first_question_ttft_s": round(t_q1, 3), "compaction_s": round(r1.seconds, 3),
                   "cells_after_first": n_before, "follow_up_ttft_s": round(t_follow, 3),
                   "cells_after_follow_up": s.n_cells,
                   "rss_mb": round(psutil.Process().memory_info().rss / 2**20)}
            if r2 is not None and r2.reselect:
                rec.update(reselect_s=round(r2.seconds, 3), recalled=r2.recalled, rewritten=r2.rewritten,
                           reprefill_tokens=r2.reprefill_tokens, store_cells=r2.store_cells,
                           store_mb=round(r2.store_bytes / 2**20, 1), share=r2.info.get("recall_share"),
                           scoring_s=round(r2.seconds - r2.info.get("reprefill_s", 0.0), 3))
                t_again, r3 = first_token_s(s, Q2)   # (a re-selection happens: reports grew)
                rec.update(again_ttft_s=round(t_again, 3), again_rewritten=r3.rewritten,
                           again_reselect_s=round(r3.seconds, 3), again_reprefill_tokens=r3.reprefill_tokens,
                           again_share=r3.info.get("recall_share"))
            out["modes"][mode] = rec
            print(shape, mode, rec, flush=True)
            s.close()
    finally:
        model.close()
    off = out["modes"].get("off")
    for mode, rec in out["modes"].items():
        if off and mode != "off":
            rec["added_vs_off"] = round(rec["follow_up_ttft_s"] / off["follow_up_ttft_s"] - 1, 3)
    return out


def render(results: list[dict]) -> str:
    lines = ["# Recall: the cost of choosing again at the follow-up question", "",
             "`scripts/bench_recall.py` (synthetic weights at real text shapes, random media K/V; 2-core VM).", "",
             "| shape | media cells | recall | follow-up TTFT | re-selection (of it: choosing) | added vs off | "
             "recalled (largest head share) | question tokens again | same question again: TTFT / rewritten / "
             "re-selection |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for mode, r in res["modes"].items():
            lines.append(
                f"| {res['shape']} | {res['media_cells']} | {mode} | {r['follow_up_ttft_s']:.2f} s | "
                + (f"{r['reselect_s']:.2f} s ({r.get('scoring_s', r['reselect_s']):.2f} s) | "
                   f"{100 * r['added_vs_off']:+.0f} % | {r['recalled']} ({r.get('share')}) | "
                   f"{r['reprefill_tokens']} | {r['again_ttft_s']:.2f} s / {r['again_rewritten']} / "
                   f"{r['again_reselect_s']:.2f} s |" if "reselect_s" in r else "- | - | - | - | - |"))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="qwen2-vl-2b")
    ap.add_argument("--media", type=int, default=16384)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--recall", default="off,ram,ram-last,disk",
                    help="Settings as `edgekv eval --recall` names them (ram-last: the question's last token again).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/recall/cost"))
    a = ap.parse_args()
    results = [run(sh, a.media, a.method, a.budget, a.threads, a.recall.split(",")) for sh in a.shapes.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/bench_recall.py " + " ".join(sys.argv[1:])
    (a.out / "recall-cost.json").write_text(json.dumps({"command": cmd, "results": results}, indent=1))
    (a.out / "recall-cost.md").write_text(render(results) + f"\nCommand: `{cmd}`\n")
    print(render(results))


if __name__ == "__main__":
    main()
