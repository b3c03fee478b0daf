"""Captioning throughput: shared-prefix reuse vs a naive loop that prefills everything per image, and
one process vs N local Ray actors; peak RSS per worker. Each configuration runs in its own process so
its peak RSS is its own.

    flock /tmp/edgekv-bench.lock python scripts/bench_caption.py --images 12 --out results/caption/run1.json

Without -m/--mmproj it builds the tiny synthetic llava pair (no real VLM weights can be installed here),
whose 256-token image is cheap: the numbers show the relative effect, not a real model's speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A realistic captioning system prompt (JoyCaption / dataset-style guides are this long or longer).
SYSTEM = ("You are an image captioning assistant for a text-to-image training dataset. Describe the "
          "image in one dense paragraph: the main subject first, then its pose, clothing and expression, "
          "then the setting, the lighting, the colour palette, the camera angle and framing, and the "
          "artistic style or medium. Mention any visible text verbatim. Do not speculate about things "
          "that are not visible, do not use the words 'image' or 'picture', do not add opinions, and do "
          "not start with 'This is'. Use plain, concrete nouns and adjectives. ") * 2


def worker(args) -> None:
    """One configuration in this process; prints a JSON line."""
    from edgekv.caption.captioner import CaptionConfig, Captioner
    from edgekv.runtime.options import ModelOptions
    from edgekv.runtime.session import peak_rss_mb

    images = sorted(Path(args.image_dir).glob("*.png"))[: args.images]
    cfg = CaptionConfig(model=args.model, mmproj=args.mmproj, model_options=ModelOptions(n_ctx=args.ctx, threads=args.threads),
                        max_tokens=args.max_tokens, method=args.method, system=args.system or None,
                        reuse_prefix=args.mode != "naive")
    t0 = time.perf_counter()
    if args.mode == "ray":
        import ray

        from edgekv.caption.ray_runner import caption_with_ray

        ray.init(num_cpus=args.actors * args.threads, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        rss, recs = {}, []

        stamps = []

        def on_record(p, rec, w, r):
            rss[w] = max(r, rss.get(w, 0.0))
            recs.append(rec)
            stamps.append(time.perf_counter())

        t1 = time.perf_counter()
        caption_with_ray(images, cfg.to_dict(), concurrency=args.actors, num_cpus=args.threads, on_record=on_record)
        wall = time.perf_counter() - t1
        ray.shutdown()
        # actors start (process + model load) inside the run: also the rate once records flow
        steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        out = {"ray_init_s": round(t_init, 2), "workers": len(rss), "peak_rss_mb": rss,
               "first_record_s": round(stamps[0] - t1, 2), "steady_images_per_s": round(steady, 3)}
        load = None
    else:
        with Captioner(cfg) as c:
            load = time.perf_counter() - t0
            head = c.head_tokens
            t1 = time.perf_counter()
            recs = [c.caption(p) for p in images]
            wall = time.perf_counter() - t1
        out = {"load_s": round(load, 2), "head_tokens": head, "peak_rss_mb": {"main": peak_rss_mb()}}
    assert all("error" not in r for r in recs), [r.get("error") for r in recs]
    per = sorted(r["seconds"] for r in recs)
    out.update(mode=args.mode, images=len(recs), wall_s=round(wall, 3), images_per_s=round(len(recs) / wall, 3),
               median_image_s=per[len(per) // 2], texts=[r["text"] for r in recs])
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="threads of the single process")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--mode", choices=["reuse", "naive", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--image-dir", help=argparse.SUPPRESS)
    ap.add_argument("--system", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return worker(args)

    from edgekv.testing.tiny import build_pair, make_test_image

    tmp = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    if not args.model:
        args.model, args.mmproj = map(str, build_pair("llava", tmp, seed=0))
    img_dir = tmp / "imgs"
    img_dir.mkdir()
    for i in range(args.images):
        (img_dir / f"{i:04d}.png").write_bytes(make_test_image(224, 224, seed=100 + i))

    def run(mode: str, system: str, threads: int) -> dict:
        cmd = [sys.executable, __file__, "--mode", mode, "--image-dir", str(img_dir), "--model", args.model,
               "--mmproj", args.mmproj, "--images", str(args.images), "--max-tokens", str(args.max_tokens),
               "--method", args.method, "--ctx", str(args.ctx), "--threads", str(threads),
               "--actors", str(args.actors), "--system", system]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if p.returncode:
            sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r.update(system_prompt_chars=len(system), threads=threads)
        print(f"{mode:6s} system={len(system):4d} chars threads={threads}: {r['images_per_s']:.2f} images/s "
              f"(median {r['median_image_s']:.3f} s/image), peak RSS "
              + ", ".join(f"{v:.0f} MiB" for v in r["peak_rss_mb"].values())
              + (f"; {r['workers']} workers, first record after {r['first_record_s']} s, then "
                 f"{r['steady_images_per_s']:.2f} images/s" if mode == "ray" else ""), flush=True)
        return r

    results = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "model": Path(args.model).name,
               "images": args.images, "max_tokens": args.max_tokens, "method": args.method, "runs": []}
    for system in ("", SYSTEM):
        a, b = run("naive", system, args.threads), run("reuse", system, args.threads)
        assert a["texts"] == b["texts"], "prefix reuse changed the captions"
        results["runs"] += [a, b]
    if not args.no_ray:
        single = run("reuse", SYSTEM, args.threads)
        one_thread = run("reuse", SYSTEM, 1)
        ray_run = run("ray", SYSTEM, 1)
        # same threads per model, same captions (1 vs 2 threads may flip a greedy token on tiny models)
        assert sorted(ray_run["texts"]) == sorted(one_thread["texts"]), "Ray changed the captions"
        results["runs"] += [single, one_thread, ray_run]
    for r in results["runs"]:
        r.pop("texts")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
