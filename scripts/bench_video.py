#!/usr/bin/env python
"""Video in bounded memory: the full cache against streamed compaction (every frame compacted right after
its prefill, context sized for budget + one chunk + text), each run in its own subprocess for a clean peak
RSS.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/edgekv-bench.lock python scripts/bench_video.py \
        [--shape qwen2-0.5b] [--frames 64] [--ratios 0.2,0.1] [--threads 2] [--out results/video]
        [--baseline-tree DIR]

--baseline-tree DIR: the streamed runs again with another checkout's edgekv (its scripts/bench_video.py
runs the child), so a change is measured against the code before it in one run, same clip, same load.

The model is synthetic (random weights, the text shapes of a real small VLM, built once into the edgekv
model cache) with a tiny llava-style projector of the same width (256 tokens per frame); the clip is
generated here with PyAV (224x224, 2 fps). Reported per run: KV cells at peak re-read from llama.cpp's
state, KV bytes allocated (n_ctx x bytes per cell: what llama.cpp reserves) and used at peak, peak RSS
(child's ru_maxrss and the parent's psutil polling), prefill frames/s (decode + encode + compaction).
Writes video.{json,md}.
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

# Text shapes of real small VLMs (config.json of their language models).
SHAPES = {
    # SmolLM2-135M: the text model of SmolVLM-256M / SmolVLM2-256M-Video (30 layers, 3 KV heads: 23 KB/cell)
    "smolvlm-256m": dict(arch="llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536,
                         n_vocab=49280, rope_freq_base=1e5, tie_embeddings=True),
    # Qwen2-0.5B: the text model of InternVL2-1B and LLaVA-OneVision-0.5B (1-D RoPE)
    "qwen2-0.5b": dict(arch="llama", n_layer=24, n_embd=896, n_head=14, n_head_kv=2, head_dim=64, n_ff=4864,
                       n_vocab=151936, tie_embeddings=True),
    # Qwen2-1.5B: Qwen2-VL-2B's text model
    "qwen2-vl-2b": dict(arch="llama", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, head_dim=128, n_ff=8960,
                        n_vocab=151936, tie_embeddings=True),
}


def build_models(shape: str, weight_type: str) -> tuple[Path, Path]:
    from edgekv.eval.gemma import models_dir
    from edgekv.testing.tiny import build_mmproj, build_text_model

    d = models_dir()
    d.mkdir(parents=True, exist_ok=True)
    text = d / f"synthetic-{shape}-{weight_type}.gguf"
    if not text.exists():
        build_text_model(text, **SHAPES[shape], weight_type=weight_type, seed=0, n_ctx=32768)
    mm = d / f"synthetic-{shape}-llava-mmproj.gguf"
    if not mm.exists():
        build_mmproj(mm, SHAPES[shape]["n_embd"], "llava")
    return text, mm


def make_clip(path: Path, frames: int, fps: int = 2, size: int = 224) -> Path:
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            img = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def child(args: dict) -> dict:
    import resource

    from edgekv.runtime import Model, Session
    from edgekv.runtime.streaming import Video, append_video, plan_video, state_cells

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    video = Video(args["clip"], fps=args["fps"], max_frames=args["frames"])
    ratio = args["ratio"]
    text_cells = 64 + 8  # chat text + the answer
    # Sizing needs the projector: a 256-cell probe context first, then the real one (the old one is freed
    # first, so it does not add to the peak).
    # Query capture as `edgekv chat` sets it: on for auto and query-aware methods (probe windows between
    # frames), off for query-agnostic ones and the full cache.
    from edgekv.methods.registry import uses_queries
    m = Model.load(args["model"], args["mmproj"], n_ctx=256, n_batch=args["n_batch"], threads=args["threads"],
                   flash_attn=args["flash_attn"], capture_queries=ratio < 1 and uses_queries(args["method"]))
    plan = plan_video(m, video, ratio if ratio < 1 else 1.0)
    n_ctx = (plan.media_tokens + plan.text_tokens if ratio >= 1 else plan.n_ctx) + text_cells
    m.resize_context(n_ctx)
    base_rss = rss_mb()
    recall = args.get("recall", "off") if ratio < 1 else "off"
    s = Session(m, method=args["method"], budget=ratio if ratio < 1 else 1.0, auto_compact=False, recall=recall)
    s.append_text("<|im_start|>user\n")
    t0 = time.perf_counter()
    stats = append_video(s, video, compact=ratio < 1)
    prefill_s = time.perf_counter() - t0
    s.append_text("\nWhat happens in the video?<|im_end|>\n<|im_start|>assistant\n")
    answer = "".join(r.text for r in s.generate(max_tokens=4))
    final = state_cells(s)
    picked = s.reports[-1].method if s.reports else ""  # e.g. "auto -> hybridkv (early...) (probe: generic)"
    per_cell = m.cell_bytes
    out = {"ratio": ratio, "method": args["method"] if ratio < 1 else "full", "n_ctx": m.n_ctx,
           "frames": stats.frames, "seconds_of_video": stats.seconds, "media_tokens": plan.media_tokens,
           "chunk": plan.chunk_tokens, "budget_cells": plan.budget_cells if ratio < 1 else plan.media_tokens,
           "peak_cells": max(stats.peak_cells, final), "final_cells": final, "bytes_per_cell": per_cell,
           "kv_alloc_bytes": m.n_ctx * per_cell, "kv_peak_bytes": max(stats.peak_cells, final) * per_cell,
           "prefill_s": prefill_s, "frames_per_s": stats.frames / prefill_s, "compact_s": stats.compact_seconds,
           "baseline_rss_mb": base_rss, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "picked": picked, "answer": answer, "recall": recall,
           "store_mb": (s.cache.store.nbytes / 2**20) if s.cache.store is not None else 0.0,
           "reselect_s": sum(r.seconds for r in s.reports if r.reselect)}
    s.close()
    m.close()
    return out


def run_child(args: dict, poll_s: float = 0.02, tree: Path | None = None) -> dict:
    from edgekv.eval.memory import run_polled

    env = dict(os.environ)
    script = __file__ if tree is None else str(tree / "scripts" / "bench_video.py")
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    try:
        r, polled = run_polled([sys.executable, script, "--child", json.dumps(args)], env=env, poll_s=poll_s)
    except RuntimeError as e:
        raise SystemExit(f"child {e}") from None
    r["polled_peak_rss_mb"] = polled
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    ap.add_argument("--weight-type", default="q4_0", choices=["q4_0", "q8_0"])
    ap.add_argument("--frames", type=int, default=64, help="Frames sampled (256 media tokens each).")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--ratios", default="0.2,0.1")
    ap.add_argument("--method", default="auto", help="Method between frames (auto: as `edgekv chat`, with probe windows).")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--flash-attn", default="auto", choices=["auto", "on", "off"],
                    help="As `edgekv chat -fa` (auto: on where llama.cpp supports it, as on CPU).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recall", default="off", help="Recall stores of the streamed runs, comma-separated "
                    "(off,disk,ram): each ratio runs once per setting; the question re-selects (docs/recall.md).")
    ap.add_argument("--out", type=Path, default=Path("results/video"))
    ap.add_argument("--baseline-tree", type=Path, help="Also run the streamed configs with this checkout's code.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    model, mmproj = build_models(a.shape, a.weight_type)
    a.out.mkdir(parents=True, exist_ok=True)
    clip = make_clip(a.out / "clip.mp4", a.frames, fps=int(a.fps))
    base = dict(model=str(model), mmproj=str(mmproj), clip=str(clip), fps=a.fps, frames=a.frames,
                method=a.method, n_batch=a.n_batch, threads=a.threads, flash_attn=a.flash_attn)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    runs = []
    jobs = [(1.0, None, "off")]
    for x in a.ratios.split(","):
        jobs += [(float(x), a.baseline_tree, "off")] if a.baseline_tree else []
        jobs += [(float(x), None, rc) for rc in a.recall.split(",")]
    for ratio, tree, rc in jobs:
        r = run_child({**base, "ratio": ratio, **({"recall": rc} if rc != "off" else {})}, tree=tree)
        r["tree"] = None if tree is None else str(tree)
        runs.append(r)
        print(f"ratio {ratio}{' (baseline tree)' if tree else ''} recall {rc}: peak cells {r['peak_cells']}, n_ctx {r['n_ctx']}, peak RSS "
              f"{max(r['peak_rss_mb'], r['polled_peak_rss_mb']):.0f} MB, {r['frames_per_s']:.2f} frames/s", flush=True)
    cmd = "python scripts/bench_video.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": cmd, "model": str(model), "shape": a.shape, "weight_type": a.weight_type, "threads": a.threads,
            "flash_attn": a.flash_attn,
            "seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "baseline": str(a.baseline_tree) if a.baseline_tree else None}
    (a.out / "video.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    clip.unlink()
    md = report(meta, runs)
    (a.out / "video.md").write_text(md)
    print(md)
    return 0


def report(meta: dict, runs: list[dict]) -> str:
    full = runs[0]
    fpeak = max(full["peak_rss_mb"], full["polled_peak_rss_mb"])
    lines = [f"# Video in bounded memory ({meta['shape']} text shapes, {meta['weight_type']}, synthetic weights)", "",
             f"`{meta['command']}`, {meta['date']}, {meta['threads']} threads, load average "
             f"{meta['loadavg_before'][0]:.1f} before / {meta['loadavg_after'][0]:.1f} after, {meta['seconds']:.0f} s.",
             f"{full['frames']} frames ({full['seconds_of_video']:.1f} s of video at 2 fps), {full['media_tokens']} media "
             f"tokens, chunk = one frame = {full['chunk']} tokens. Each run is a fresh subprocess.", "",
             "| run | n_ctx | peak KV cells (re-read) | budget + chunk | KV allocated MiB | vs full | KV at peak MiB | "
             "peak RSS MiB | RSS drop MiB | KV saving MiB | drop / saving | prefill frames/s | vs full | compaction s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        peak = max(r["peak_rss_mb"], r["polled_peak_rss_mb"])
        pick = r.get("picked", "").split(" (early")[0].replace("auto -> ", "auto: ")
        name = "full cache" if r["ratio"] >= 1 else f"streamed, {pick or r['method']} @ {r['ratio']:g}"
        if r.get("tree"):
            name += f" (baseline: {meta.get('baseline', r['tree'])})"
        if r.get("recall", "off") != "off":
            name += (f", recall {r['recall']} (store {r['store_mb']:.0f} MiB, re-selection "
                     f"{r['reselect_s']:.1f} s)")
        saving = (full["kv_alloc_bytes"] - r["kv_alloc_bytes"]) / 2**20
        bc = "" if r["ratio"] >= 1 else f"{r['final_cells']} + {r['chunk']} = {r['final_cells'] + r['chunk']}"
        lines.append(
            f"| {name} | {r['n_ctx']} | {r['peak_cells']} | {bc} | {r['kv_alloc_bytes'] / 2**20:.1f} | "
            f"{100 * r['kv_alloc_bytes'] / full['kv_alloc_bytes']:.0f}% | {r['kv_peak_bytes'] / 2**20:.1f} | {peak:.0f} | "
            f"{fpeak - peak:.0f} | {saving:.1f} | {f'{100 * (fpeak - peak) / saving:.0f}%' if saving else ''} | "
            f"{r['frames_per_s']:.2f} | "
            f"{100 * r['frames_per_s'] / full['frames_per_s']:.0f}% | {r['compact_s']:.1f} |")
    lines += ["", "Budget B = the cells kept at the end (compacted frames + text), re-read from llama.cpp's state; "
              "KV allocated = n_ctx x bytes per cell (what llama.cpp reserves when the context is made)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
