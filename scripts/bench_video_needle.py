#!/usr/bin/env python
"""A needle frame in a long "video" of document frames: the full cache against streamed compaction.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/edgekv-bench.lock python scripts/bench_video_needle.py \
        [--tasks passkey,word] [--lengths 1024,2048] [--depths 0.1,0.5,0.9] [--samples 1] \
        [--ratios 0.2,0.1] [--threads 2] [--recall off|ram|disk] [--out results/video-needle]

The real Gemma 3 270M reads each eval needle sample (`edgekv.eval.tasks`: real filler, a pass key or a
secret word at a depth) as a clip: the document's tokens as 256-token text-in-pixels frames
(`edgekv.eval.pixels`), fed through `edgekv.runtime.streaming.append_video` with a timestamp between frames
(one frame every --frame-gap seconds), after the task's header as text; the question follows as text (raw
prompt, no chat template). Per sample: the full cache, then streamed compaction (every frame compacted right
after its prefill, `auto` between frames) at each ratio with (a) the generic probe (question not known) and
(b) the question itself as the probe (`Session(probe=...)`). Reported: accuracy and accuracy relative to
the full cache with n and a 95 % Wilson interval, peak KV cells re-read from llama.cpp's state against the
cells kept at the end (B) + the largest chunk (C), and seconds. The media tokens are text tokens: this
measures whether a fact inside a frame survives compaction, not how redundant natural video is.
--recall (issue 20): the streamed runs' Sessions get that recall store (never the full cache), and their
question is prefilled with its queries captured so the store can bring cells back; recorded per record.
Writes video-needle.{json,md}.
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

ANSWER_TOKENS = 8  # as `edgekv eval` (GridConfig.max_new_tokens)


def load(threads: int, n_ctx: int, model_path: str | None = None):
    """(model, codec, pad id) for Gemma 3 270M (or `model_path`) with its text-in-pixels projector."""
    from edgekv.eval.gemma import gemma_path
    from edgekv.eval.pixels import PixelCodec, build_projector
    from edgekv.runtime import Model

    path = model_path or str(gemma_path())
    model = Model.load(path, build_projector(path), n_ctx=n_ctx, threads=threads, flash_attn="off")
    pad = model.tokenize("\n", add_bos=False, special=False)[-1]   # as the eval's media path pads
    return model, PixelCodec.for_model(path), pad


def samples(model, tasks, lengths, depths, n: int, seed: int = 0):
    from edgekv.eval.engine import ModelTokenizer
    from edgekv.eval.tasks import TaskSpec, build_samples

    spec = TaskSpec(tasks=tuple(tasks), lengths=tuple(lengths), depths=tuple(depths), samples=n, seed=seed)
    return build_samples(ModelTokenizer(model), spec)


def run_one(model, codec, pad: int, sample, ratio: float | None, probe, frame_gap: float = 0.5,
            as_chunk: bool = False, recall: str = "off") -> dict:
    """One sample as a clip: header (text), the document as frames with timestamps, the question (text),
    greedy answer. ratio None: the full cache; else streamed compaction at that per-frame ratio with
    `probe` (True: generic, a token list: the question). as_chunk: plan each frame on its own cells with
    the probe window outside the view, as the LastChunk region does on non-iSWA models (Gemma 3 is
    iSWA, so its streamed compaction reads the whole cache; this measures chunk-only planning on it)."""
    from edgekv.eval.recall import report_fields, session_kwargs
    from edgekv.eval.scoring import retrieval_hit
    from edgekv.runtime import Session
    from edgekv.runtime.streaming import Video, append_video, state_cells

    frames = codec.encode(sample.context, pad=pad)
    clip = Video([(i * frame_gap, f) for i, f in enumerate(frames)], fps=None, max_frames=None, max_side=None,
                 name=sample.key)
    recall = "off" if ratio is None else recall   # the full-cache reference never recalls
    s = Session(model, method="auto", budget=ratio or 1.0, auto_compact=False,
                probe=probe if probe in (True, False) or isinstance(probe, list) else True, **session_kwargs(recall))
    s.cache.plan_as_chunk = as_chunk
    try:
        t0 = time.perf_counter()
        s.append_tokens(list(sample.prefix), compressible=False)
        after = probe == "after"   # the whole clip prefilled, compacted once with the question (the target)
        stats = append_video(s, clip, budget=ratio, compact=ratio is not None and not after)
        s.append_tokens(list(sample.question), compressible=False, capture=recall != "off" or after)
        if after:
            s.compact()
        answer = "".join(r.text for r in s.generate(max_tokens=ANSWER_TOKENS, temperature=0.0))
        seconds = time.perf_counter() - t0
        final = state_cells(s)   # kept frames + header + timestamps + question + answer, re-read
        methods = sorted({r.method for r in s.reports})
        recalled = report_fields(s.reports)
    finally:
        s.close()
    return {"sample": sample.key, "task": sample.task, "length": sample.length, "depth": sample.depth,
            "source": sample.source, "answer": sample.answer, "generated": answer,
            "score": float(retrieval_hit(answer, sample.answer)),
            "run": "full" if ratio is None else (("after" if probe == "after" else "generic" if probe is True
                                                  else "agnostic" if probe is False else "question")
                                                 + ("-chunk" if as_chunk else "")),
            "ratio": ratio, "frames": stats.frames, "seconds_of_video": stats.seconds,
            "media_tokens": stats.media_tokens, "chunk_cells": stats.chunk_cells or codec.tokens_per_image,
            "peak_cells": max(stats.peak_cells, final), "final_cells": final,
            "prefill_s": stats.prefill_seconds, "compact_s": stats.compact_seconds, "seconds": seconds,
            "methods": methods, "recall": recall, **recalled}


def summarize(records: list[dict]) -> list[dict]:
    """One row per (run, ratio): accuracy [Wilson], relative to the full cache on the same samples, cells
    and seconds (means; peak vs B + C per record)."""
    from edgekv.eval.report import wilson

    full = {r["sample"]: r["score"] for r in records if r["run"] == "full"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for task in ("all", r["task"]):
            groups.setdefault((task, r["run"], r["ratio"]), []).append(r)
    rows = []
    for (task, run, ratio), rs in groups.items():
        n, k = len(rs), sum(r["score"] for r in rs)
        ref = sum(full.get(r["sample"], 0.0) for r in rs)
        kept = sum(r["score"] for r in rs if full.get(r["sample"]))
        rows.append({"task": task, "run": run, "ratio": ratio, "n": n, "hits": k, "accuracy": k / n, "ci": wilson(k, n),
                     "full_hits": ref, "relative": (k / ref) if ref else None,
                     "kept_of_full_hits": kept,
                     "peak_cells": max(r["peak_cells"] for r in rs),
                     "peak_mean": sum(r["peak_cells"] for r in rs) / n,
                     "final_mean": sum(r["final_cells"] for r in rs) / n,
                     "chunk": max(r["chunk_cells"] for r in rs),
                     "peak_within_b_plus_c": all(r["peak_cells"] <= r["final_cells"] + r["chunk_cells"] for r in rs),
                     "seconds_mean": sum(r["seconds"] for r in rs) / n,
                     "compact_s_mean": sum(r["compact_s"] for r in rs) / n,
                     "methods": sorted({m for r in rs for m in r["methods"]})})
    rows.sort(key=lambda r: (r["task"] != "all", r["task"], r["run"] != "full", -(r["ratio"] or 1.0), r["run"]))
    return rows


def markdown(rows: list[dict], records: list[dict], config: dict) -> str:
    label = {"full": "full cache", "generic": "streamed, generic probe (question not known)",
             "agnostic": "streamed, no probe (query-agnostic between frames)",
             "after": "whole clip prefilled, compacted once with the question (full cache until then)",
             "question": "streamed, the question as probe (known in advance)",
             "generic-chunk": "streamed, generic probe, each frame planned on its own cells",
             "question-chunk": "streamed, question probe, each frame planned on its own cells"}
    lines = ["# Needle frame in a \"video\" of document frames (text-in-pixels Gemma 3 270M)", "",
             "```", config["command"], "```", "",
             f"{len(config['samples'])} samples: tasks {', '.join(config['tasks'])}, lengths "
             f"{', '.join(map(str, config['lengths']))} tokens, depths {', '.join(map(str, config['depths']))}; "
             "256 tokens a frame, one frame every "
             f"{config['frame_gap']} s; recall {config.get('recall', 'off')}; {config['total_s']:.0f} s in all. "
             f"{'PARTIAL: ' + config['partial'] if config.get('partial') else ''}", "",
             "| task | run | ratio | accuracy [95 % Wilson] | relative to full | n | peak KV cells (max; mean) | "
             "end cells B (mean) + chunk C | peak <= B + C | s per sample (compaction) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else ""
        rel = f"{r['relative']:.2f}" if r["relative"] is not None else "–"
        lines.append(f"| {r['task']} | {label[r['run']]} | {r['ratio'] if r['ratio'] else '–'} | {r['accuracy']:.2f} {ci} | {rel} "
                     f"({r['kept_of_full_hits']:g} of {r['full_hits']:g} full hits kept) | {r['n']} | "
                     f"{r['peak_cells']} ; {r['peak_mean']:.0f} | {r['final_mean']:.0f} + {r['chunk']} | "
                     f"{'yes' if r['peak_within_b_plus_c'] else 'NO'} | {r['seconds_mean']:.1f} "
                     f"({r['compact_s_mean']:.1f}) |")
    lines += ["", "Methods between frames: " + "; ".join(
        f"{r['run']}@{r['ratio']}: {', '.join(r['methods'])}" for r in rows if r["methods"] and r["task"] == "all"), "",
        "## Records", "", "| sample | run | ratio | answer | generated | hit | peak | end |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        gen = r["generated"].replace("|", "/").replace("\n", " ").strip()
        lines.append(f"| {r['sample']} | {r['run']} | {r['ratio'] or '–'} | {r['answer']} | {gen} | {r['score']:g} | "
                     f"{r['peak_cells']} | {r['final_cells']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="passkey,word", help="Needle tasks of edgekv eval (passkey, word, kv, pair).")
    ap.add_argument("--lengths", default="1024,2048", help="Prompt tokens per sample (256 a frame).")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--samples", type=int, default=1, help="Per (task, length, depth); filler alternates.")
    ap.add_argument("--ratios", default="0.2,0.1")
    ap.add_argument("--runs", default="generic,question",
                    help="Streamed runs: generic and/or question probe, or agnostic (no probe between frames); "
                         "after: the whole clip prefilled, then compacted with the question (the target); "
                         "generic-chunk / question-chunk: the same, each frame planned on its own cells (as the "
                         "LastChunk region).")
    ap.add_argument("--frame-gap", type=float, default=0.5, help="Seconds between frames (timestamps).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="Text GGUF (default: Gemma 3 270M from the eval package).")
    ap.add_argument("--max-seconds", type=float, default=0, help="Stop starting samples after this (0: none).")
    ap.add_argument("--stop-at", type=float, default=0, help="Unix time after which no sample starts (0: none).")
    ap.add_argument("--recall", choices=("off", "ram", "disk", "ram-last", "disk-last"), default="off",
                    help="Recall store of the streamed runs (issue 20); the full cache never has one.")
    ap.add_argument("--out", type=Path, default=Path("results/video-needle"))
    ap.add_argument("--render", action="store_true", help="Only rewrite the report from --out's saved records.")
    args = ap.parse_args(argv)
    if args.render:   # e.g. after a change to the tables: same records, nothing re-run
        path = args.out / "video-needle.json"
        data = json.loads(path.read_text())
        data["summary"] = summarize(data["records"])
        path.write_text(json.dumps(data, indent=1))
        (args.out / "video-needle.md").write_text(markdown(data["summary"], data["records"], data["config"]))
        return 0

    from edgekv.errors import EdgeKVError
    from edgekv.eval.recall import check_recall

    try:
        check_recall(args.recall)
    except EdgeKVError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    tasks = [t for t in args.tasks.split(",") if t]
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]
    runs = [r for r in args.runs.split(",") if r]
    t_start = time.perf_counter()
    model, codec, pad = load(args.threads, max(lengths) + 512, args.model)
    todo = samples(model, tasks, lengths, depths, args.samples)
    records: list[dict] = []
    command = "python scripts/bench_video_needle.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(partial: str) -> str:
        """Results so far (rewritten after every sample, so a run stopped early leaves labelled numbers)."""
        rows = summarize(records)
        config = {"command": command, "tasks": tasks, "lengths": lengths, "depths": depths, "ratios": ratios,
                  "runs": runs, "frame_gap": args.frame_gap, "threads": args.threads, "recall": args.recall,
                  "samples": sorted({r["sample"] for r in records}), "planned_samples": len(todo),
                  "partial": partial, "total_s": time.perf_counter() - t_start}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "video-needle.json").write_text(json.dumps({"config": config, "summary": rows,
                                                                "records": records}, indent=1))
        md = markdown(rows, records, config)
        (args.out / "video-needle.md").write_text(md)
        return md

    partial = ""
    try:
        for i, smp in enumerate(todo):
            now = time.perf_counter()
            if (args.max_seconds and now - t_start > args.max_seconds) or (args.stop_at and time.time() > args.stop_at):
                partial = f"stopped after {i} of {len(todo)} samples (time limit)"
                break
            records.append(run_one(model, codec, pad, smp, None, None, args.frame_gap))
            for ratio in ratios:
                for run in runs:
                    probe = (True if run.startswith("generic") else False if run.startswith("agnostic")
                             else "after" if run == "after" else list(smp.question))
                    records.append(run_one(model, codec, pad, smp, ratio, probe, args.frame_gap,
                                           as_chunk=run.endswith("-chunk"), recall=args.recall))
            done = [r for r in records if r["sample"] == smp.key]
            print(f"{smp.key}: " + " ".join(f"{r['run']}@{r['ratio'] or 1}={r['score']:g}" for r in done)
                  + f" ({time.perf_counter() - t_start:.0f} s)", flush=True)
            if i + 1 < len(todo):
                write(f"in progress: {i + 1} of {len(todo)} samples done")
    finally:
        model.close()
    md = write(partial)
    print(md.split("## Records")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
