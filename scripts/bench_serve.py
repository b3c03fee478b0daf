"""Follow-up turn latency with the kept compacted cache vs re-encoding the image, and host memory per kept
conversation vs the full cache, through a live `edgekv serve` and the openai client.

Three servers in turn on the tiny llava-tiles pair (a 672x672 image = 10 chunks, 2560 tokens):
  reuse     --method snapkv --budget B, conversation cache on: a follow-up prefills only its new message
  re-encode the same with --cache-ram 0: every follow-up prefills the whole conversation, image included
            (what llama-server does with a projector loaded, llama.cpp #18686)
  full      --method full, cache on: what a kept conversation costs without compaction

    flock /tmp/edgekv-bench.lock python scripts/bench_serve.py --out results/serve
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai

QUESTIONS = ["what is in the picture", "what color is it", "is there a cat", "describe the text",
             "what is on the left", "and on the right", "is it a video frame", "describe it again"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, mmproj: Path, args, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", "from edgekv.cli.main import main; main()", "serve", "-m", str(model),
           "--mmproj", str(mmproj), "-t", str(args.threads), "-c", str(args.ctx), "-b", "2048",
           "--port", str(port), "--alias", "bench", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def run(name: str, model: Path, mmproj: Path, image_url: str, args, *extra: str) -> dict:
    proc, url = start(model, mmproj, args, *extra)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        msgs = [{"role": "user", "content": [{"type": "text", "text": "describe this image"},
                                             {"type": "image_url", "image_url": {"url": image_url}}]}]
        turns = []
        for i in range(args.turns + 1):
            t0 = time.perf_counter()
            ttft = None
            text, final = [], None
            for chunk in client.chat.completions.create(model="bench", messages=msgs, max_tokens=args.tokens,
                                                        stream=True):
                for c in chunk.choices:
                    if c.delta.content and ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(c.delta.content or "")
                    if c.finish_reason:
                        final = chunk.model_extra["edgekv"]
            total = time.perf_counter() - t0
            turns.append({"turn": i + 1, "seconds": total, "first_token_s": ttft, **{
                k: final[k] for k in ("cache", "images_encoded", "media_chunks_encoded", "cells_before",
                                      "cells_after", "bytes_before", "bytes_after", "kv_cells", "kept_bytes")}})
            msgs += [{"role": "assistant", "content": "".join(text)},
                     {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    follow = turns[1:]
    return {"name": name, "options": list(extra), "turns": turns,
            "follow_up_median_s": statistics.median(t["seconds"] for t in follow),
            "follow_up_first_token_median_s": statistics.median(t["first_token_s"] or t["seconds"] for t in follow),
            "images_encoded": health["images_encoded"], "media_chunks_encoded": health["media_chunks_encoded"],
            "kept_conversations": health["conversation_cache"]["conversations"],
            "kept_bytes": health["conversation_cache"]["bytes"]}


# SmolVLM-256M's text model (the video benchmark uses the same shape): a real-size prefill on 2 cores.
SHAPES = {"smolvlm-256m": dict(arch="llama", n_layer=30, n_embd=576, n_head=9, n_head_kv=3, head_dim=64,
                               n_ff=1536, n_vocab=49280, rope_freq_base=1e5, tie_embeddings=True)}


def build_models(shape: str, out: Path) -> tuple[Path, Path]:
    """The tiny llava-tiles pair, or a text model with a real shape (random q4_0 weights) and the tiny
    llava-tiles projector sized for it. The projector stays tiny either way: a real vision encoder would
    add its own time to every re-encode, so the re-encode column is a lower bound."""
    from edgekv.testing import tiny

    if shape == "tiny":
        return tiny.build_pair("llava-tiles", out)
    text = tiny.build_text_model(out / f"{shape}.gguf", weight_type="q4_0", **SHAPES[shape])
    v_kv, v_tensors = tiny._llava_mmproj(SHAPES[shape]["n_embd"], tiny._LLAVA_PINPOINTS, f"{shape}-mmproj")
    mmproj = tiny._write_gguf(out / f"{shape}-mmproj.gguf", "clip", v_kv, v_tensors, np.random.default_rng(1))
    return text, mmproj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/serve"))
    ap.add_argument("--turns", type=int, default=5, help="follow-up turns after the image turn")
    ap.add_argument("--tokens", type=int, default=8, help="answer tokens per turn")
    ap.add_argument("--size", type=int, default=672, help="image side (672 -> 3x3 tiles + overview)")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES],
                    help="text model: the tiny llava-tiles one, or a real shape with random weights")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from edgekv.testing.tiny import make_test_image

    with tempfile.TemporaryDirectory() as tmp:
        model, mmproj = build_models(args.shape, Path(tmp))
        image_url = "data:image/png;base64," + base64.b64encode(make_test_image(args.size, args.size, 1)).decode()
        method = ["--method", args.method, "--budget", args.budget]
        runs = [run("reuse", model, mmproj, image_url, args, *method),
                run("re-encode", model, mmproj, image_url, args, *method, "--cache-ram", "0"),
                run("full", model, mmproj, image_url, args, "--method", "full", "--budget", "1")]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "machine": platform.platform(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    (args.out / f"bench_serve-{args.shape}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    reuse, reenc, full = runs
    lines = [f"# bench_serve: {args.shape} text model, {args.size}x{args.size} image "
             f"({meta['date']}, {meta['cpus']} CPUs)", "", f"`{meta['command']}`", "",
             "| run | follow-up median s | first token median s | images encoded | kept conversations | kept bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['follow_up_median_s']:.3f} | {r['follow_up_first_token_median_s']:.3f} | "
                     f"{r['images_encoded']} | {r['kept_conversations']} | {r['kept_bytes']} |")
    t1 = reuse["turns"][0]
    lines += ["", f"image turn: KV {t1['bytes_before']} -> {t1['bytes_after']} bytes "
              f"({t1['cells_before']} -> {t1['cells_after']} cells)",
              f"follow-up speed-up (re-encode / reuse): "
              f"{reenc['follow_up_median_s'] / reuse['follow_up_median_s']:.2f}x",
              f"kept conversation (compacted / full): {reuse['kept_bytes']} / {full['kept_bytes']} bytes = "
              f"{reuse['kept_bytes'] / full['kept_bytes']:.2f}"]
    (args.out / f"bench_serve-{args.shape}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
