"""`edgekv chat`: one-shot (-p) or an interactive REPL with /image, /clear, /stats, /exit."""
from __future__ import annotations

from pathlib import Path

import click

from edgekv.cli.options import ImagePath, load_model_from_options, method_options, model_options
from edgekv.cli.report import echo_report
from edgekv.errors import EdgeKVError, MediaError

HELP = "commands: /image PATH, /video PATH (attach to the next message), /clear, /stats, /exit"


@click.command()
@model_options
@method_options
@click.option("--image", "images", type=ImagePath(), multiple=True, help="Image to attach (repeatable).")
@click.option("--video", "videos", type=click.Path(path_type=Path), multiple=True,
              help="Video to attach (repeatable): frames streamed into a context sized for the budget.")
@click.option("--video-fps", type=float, default=1.0, show_default=True, help="Frames sampled per second of video.")
@click.option("--video-max-frames", type=int, default=64, show_default=True,
              help="At most this many frames per video, spread uniformly over the clip when the fps gives more.")
@click.option("--max-kv-cells", type=click.IntRange(16), default=None,
              help="Cap the KV cache at N cells: the context is N cells and every image/frame chunk is "
                   "compacted right after its prefill (video: the budget is lowered to fit).")
@click.option("-p", "--prompt", help="One-shot prompt; without it, an interactive chat.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temp", "temperature", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-report", is_flag=True, help="Do not print the memory/speed report.")
def chat(model, mmproj, hf_repo, offline, n_ctx, n_batch, n_gpu_layers, flash_attn, cache_type_k, cache_type_v,
         threads, image_max_tokens, method, budget, compress, images, videos, video_fps, video_max_frames,
         max_kv_cells, prompt, max_tokens, temperature, top_p, seed, no_report):
    """Chat about images and videos with a compressed KV cache."""
    from edgekv.methods import uses_queries
    from edgekv.runtime import Session
    from edgekv.runtime.streaming import Video, streaming

    clips = [Video(p, fps=video_fps, max_frames=video_max_frames) for p in videos]  # bad clips fail here
    if max_kv_cells is not None:
        n_ctx = max_kv_cells
    elif clips:
        # a placeholder, resized below once the projector says what the clips cost; the REPL keeps -c as a
        # floor so the conversation has room after the first answer
        n_ctx, floor = min(n_ctx, 512), (0 if prompt is not None else n_ctx)

    # A query-agnostic method never reads the question window: skip capturing it (one Python callback
    # per graph node otherwise, 0.3-1.5 % of decode time, and the window's own prefill batch).
    m = load_model_from_options(model, mmproj, hf_repo, offline, n_ctx=n_ctx, n_batch=n_batch,
                                n_gpu_layers=n_gpu_layers, threads=threads, flash_attn=flash_attn,
                                cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                image_max_tokens=image_max_tokens, capture_queries=uses_queries(method))
    if images and m.mtmd is None:
        raise EdgeKVError("--image needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    if clips and m.mtmd is None:
        m.close()
        raise EdgeKVError("--video needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    if clips and max_kv_cells is None:
        from edgekv.cli.video import context_for
        try:
            m.resize_context(max(floor, context_for(m, clips, list(images), budget, prompt or "", max_tokens)))
        except BaseException:
            m.close()
            raise
    session = Session(m, method=method, budget=budget, compress=compress, seed=seed)
    if clips or max_kv_cells is not None:
        streaming(session)  # every image / frame chunk compacted right after its prefill
    gen = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    sampling = dict(fps=video_fps, max_frames=video_max_frames)
    try:
        if prompt is not None:
            stream_turn(session, prompt, list(images), gen, not no_report, clips, max_kv_cells is not None)
        else:
            _repl(session, list(images), gen, not no_report, clips, sampling, max_kv_cells is not None)
    finally:
        session.close()
        m.close()


def stream_turn(session, prompt: str, images: list[Path], gen: dict, report: bool, videos=(),
                fit_videos: bool = False) -> None:
    """One user turn: stream the answer to stdout, then the report to stderr. A clip that broke half-way
    was answered from the frames before the damage; that is then one Error line (exit 2) after the answer."""
    last = None
    extra = {}
    if videos:
        from edgekv.cli.video import check_fits

        # before the turn touches the cache; under --max-kv-cells the clips' budgets are lowered to fit
        check_fits(session, list(videos), prompt, gen.get("max_tokens", 256), fit_videos)
        extra = {"videos": list(videos)}
    n_stats = len(session.video_stats)
    for r in session.chat(prompt, images, **gen, **extra):
        click.echo(r.text, nl=False)
        last = r
    click.echo()
    if report:
        echo_report(session, last)
    if videos:
        from edgekv.cli.video import echo_video_report

        damaged = echo_video_report(session, session.video_stats[n_stats:], report)
        if damaged:
            raise MediaError(damaged)


def _repl(session, images: list[Path], gen: dict, report: bool, videos=(), sampling=None,
          fit_videos: bool = False) -> None:
    from edgekv.runtime.streaming import Video

    click.echo(f"edgekv chat ({session.method_name}, budget {session.budget}). {HELP}", err=True)
    pending = list(images)
    pending_videos = list(videos)
    while True:
        try:
            line = click.prompt("", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            click.echo(err=True)
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            session.clear()
            session.reports.clear()
            pending.clear()
            pending_videos.clear()
            click.echo("(conversation cleared)", err=True)
            continue
        if line == "/stats":
            echo_report(session)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending.append(ImagePath().convert(path, None, None))
                click.echo(f"(attached {path} to the next message)", err=True)
            except click.BadParameter as e:
                click.echo(f"Error: {e.message}", err=True)
            continue
        if line.startswith("/video"):
            path = line[len("/video"):].strip()
            try:
                pending_videos.append(Video(Path(path).expanduser(), **(sampling or {})))
                click.echo(f"(attached video {path} to the next message)", err=True)
            except EdgeKVError as e:
                click.echo(f"Error: {e}", err=True)
            continue
        if line.startswith("/"):
            click.echo(f"unknown command {line.split()[0]}; {HELP}", err=True)
            continue
        try:
            stream_turn(session, line, pending, gen, report, pending_videos, fit_videos)
        except EdgeKVError as e:  # a bad image must not end the conversation
            click.echo(f"Error: {e}", err=True)
        pending, pending_videos = [], []
