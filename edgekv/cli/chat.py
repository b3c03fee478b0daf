"""`edgekv chat`: one-shot (-p) or an interactive REPL with /image, /clear, /stats, /exit."""
from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from edgekv.cli.options import (ImagePath, apply_kv_memory, kv_memory_option, load_model_from_options, method_options,
                                model_options, recall_options, resolve_model_paths, sampling_options, video_options)
from edgekv.cli.report import echo_report
from edgekv.errors import Cancelled, ContextOverflowError, EdgeKVError, MediaError, error_lines
from edgekv.runtime.kinds import PACKED
from edgekv.runtime.probe import question_probe

HELP = ("commands: /image PATH, /video PATH (attach to the next message), /save PATH, /load PATH, /clear, /stats, /exit; "
        "Ctrl-C stops an answer, Ctrl-C at the prompt or Ctrl-D exits")


@click.command()
@model_options
@method_options
@recall_options
@click.option("--image", "images", type=ImagePath(), multiple=True, help="Image to attach (repeatable).")
@click.option("--video", "videos", type=click.Path(path_type=Path), multiple=True,
              help="Video to attach (repeatable): frames streamed into a context sized for the budget.")
@video_options
@kv_memory_option
@click.option("-p", "--prompt", help="One-shot prompt; without it, an interactive chat.")
@sampling_options
@click.option("--no-report", is_flag=True, help="Do not print the memory/speed report.")
def chat(model, mmproj, hf_repo, offline, model_opts, method, budget, compress, swa_budget, recall, recall_dir, recall_type,
         recall_min_share,
         images, videos, video_fps, video_max_frames, max_kv_cells, kv_memory, prompt, max_tokens, temperature, top_p,
         top_k, min_p, stops, seed, no_report):
    """Chat about images and videos with a compressed KV cache."""
    from edgekv.methods import uses_queries
    from edgekv.runtime import Session
    from edgekv.runtime.streaming import Video, streaming

    # the option that sets the context when one caps it (a "does not fit" hint names it, not -c)
    cap_option = "--max-kv-cells" if max_kv_cells is not None else None
    if kv_memory is not None:   # the cache types, the budget and (as --max-kv-cells) the context from one knob
        model, mmproj = resolve_model_paths(model, mmproj, hf_repo, offline)
        hf_repo = None
        model_opts, budget, cells, picked, swa_budget = apply_kv_memory(kv_memory, model_opts, budget,
                                                                        (model, mmproj), swa_budget)
        if max_kv_cells is None and cells is not None:
            max_kv_cells, cap_option = cells, "--kv-memory"
        click.echo(f"edgekv: {picked}; context {max_kv_cells or model_opts.n_ctx} cells", err=True)
    clips = [Video(p, fps=video_fps, max_frames=video_max_frames) for p in videos]  # bad clips fail here
    floor, n_ctx = 0, model_opts.n_ctx
    if max_kv_cells is not None:
        n_ctx = max_kv_cells
    elif clips:
        # a placeholder, resized below once the projector says what the clips cost; the REPL keeps -c as a
        # floor so the conversation has room after the first answer
        n_ctx, floor = min(n_ctx, 512), (0 if prompt is not None else n_ctx)

    # A query-agnostic method never reads the question window: skip capturing it (one Python callback
    # per graph node otherwise, 0.3-1.5 % of decode time, and the window's own prefill batch).
    m = load_model_from_options(model, mmproj, hf_repo, offline, model_opts, n_ctx=n_ctx,
                                capture_queries=uses_queries(method))
    if images and m.mtmd is None:
        raise EdgeKVError("--image needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    if clips and m.mtmd is None:
        m.close()
        raise EdgeKVError("--video needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    if clips and max_kv_cells is None:
        from edgekv.runtime.sizing import context_for

        try:
            m.resize_context(max(floor, context_for(m, clips, list(images), budget, prompt or "", max_tokens)))
        except BaseException:
            m.close()
            raise
    # one-shot: the question is known before the images are read, so early compaction probes with it
    try:
        session = Session(m, method=method, budget=budget, compress=compress, seed=seed,
                          probe=question_probe(prompt), recall=recall, recall_dir=recall_dir, recall_type=recall_type,
                          recall_min_share=recall_min_share, swa_budget=swa_budget)
    except BaseException:
        m.close()
        raise
    if clips or max_kv_cells is not None:
        streaming(session)  # every image / frame chunk compacted right after its prefill
    fit = cap_option
    gen = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
               stop=tuple(stops))
    try:
        if prompt is not None:
            stream_turn(session, prompt, list(images), gen, not no_report, clips, fit)
        else:
            _repl(session, list(images), gen, not no_report, clips, dict(fps=video_fps, max_frames=video_max_frames),
                  fit)
    finally:
        session.close()
        m.close()


def read_line(prompt: str) -> str:
    """One line from stdin (EOFError at its end). On a terminal it polls instead of blocking in read():
    the kernel may hand Ctrl-C's SIGINT to one of llama.cpp's threads, and Python raises KeyboardInterrupt
    in the main thread only when that runs Python code, never inside a blocking read."""
    click.echo(prompt, nl=False)
    stdin = sys.stdin
    if os.name != "nt" and stdin.isatty():
        while not select.select([stdin], [], [], 0.1)[0]:
            pass
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


@contextlib.contextmanager
def ctrl_c_cancels(session):
    """While a turn runs, Ctrl-C cancels it (session.cancel(): the answer so far is kept, a prefill is
    undone) instead of killing the process; a second Ctrl-C interrupts for real (e.g. during an image
    encode, which llama.cpp cannot abort).

    Python runs signal handlers only when the main thread runs Python code, not while it sits in
    llama_decode; so the C-level handler's wakeup byte also wakes a watcher thread, which cancels at once
    (the main thread holds no GIL inside llama.cpp) and llama.cpp's abort callback stops the batch."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = []

    def on_sigint(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt
        session.cancel()

    r, w = socket.socketpair()
    w.setblocking(False)

    def watch() -> None:
        while True:
            try:
                data = r.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT in data:
                session.cancel()

    old = signal.signal(signal.SIGINT, on_sigint)
    old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="edgekv-ctrl-c", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGINT, old)
        w.close()  # the watcher's recv returns b""
        watcher.join(timeout=2)
        r.close()


def stream_turn(session, prompt: str, images: list[Path], gen: dict, report: bool, videos=(),
                cap_option: str | None = None) -> bool:
    """One user turn: stream the answer to stdout, then this turn's report to stderr. False when Ctrl-C
    cancelled it before the answer (the conversation is as before). A clip that broke half-way was
    answered from the frames before the damage; that is then one Error line (exit 2) after the answer."""
    last = None
    n_reports = len(session.reports)
    extra = {}
    if videos:
        from edgekv.runtime.sizing import check_fits

        # before the turn touches the cache; under --max-kv-cells the clips' budgets are lowered to fit
        check_fits(session, list(videos), prompt, gen.get("max_tokens", 256), cap_option is not None)
        extra = {"videos": list(videos)}
    from edgekv.runtime.streaming import ChunkCompactor, streaming

    n_stats = len(session.video_stats)
    hook = session.after_media_chunk
    if videos and not isinstance(hook, ChunkCompactor):  # a /video in a chat started without one: as --video
        hook = streaming(session)
        hook.media_tokens = sum(r.n_candidates for r in session.reports)  # /stats: the whole-cache ones so far
    media_before = hook.media_tokens if isinstance(hook, ChunkCompactor) else 0
    try:
        with ctrl_c_cancels(session):
            for r in session.chat(prompt, images, **gen, **extra):
                click.echo(r.text, nl=False)
                last = r
    except Cancelled:
        click.echo("(cancelled before the answer; the conversation is as before)", err=True)
        return False
    except ContextOverflowError as e:
        if cap_option:  # --max-kv-cells or --kv-memory sets the context: -c is ignored, so the hint names it
            raise e.under(cap_option) from None
        raise
    click.echo()
    if last is not None and last.finish_reason == "cancelled":
        click.echo("(stopped; the answer so far is kept)", err=True)
    if report:
        media = hook.media_tokens - media_before if isinstance(hook, ChunkCompactor) else None
        echo_report(session, last, session.reports[n_reports:], media)
    if videos:
        from edgekv.cli.video import echo_video_report

        damaged = echo_video_report(session, session.video_stats[n_stats:], report)
        if damaged:
            raise MediaError(damaged)
    return True


def _repl(session, images: list[Path], gen: dict, report: bool, videos=(), sampling=None,
          cap_option: str | None = None) -> None:
    from edgekv.runtime.streaming import Video

    click.echo(f"edgekv chat ({session.method_name}, budget {session.budget}). {HELP}", err=True)
    pending = list(images)
    pending_videos = list(videos)
    while True:
        try:
            line = read_line("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
            click.echo(err=True)
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            session.clear()
            pending.clear()
            pending_videos.clear()
            click.echo("(conversation cleared)", err=True)
            continue
        if line == "/stats":
            echo_report(session)
            continue
        if line.split()[0] in ("/save", "/load"):
            cmd, _, path = line.partition(" ")
            path = path.strip()
            if not path:
                click.echo(f"Error: {cmd} needs a file path", err=True)
                continue
            try:
                if cmd == "/save":
                    session.save(path)
                    click.echo(f"(conversation saved to {path})", err=True)
                else:
                    session.load_conversation(path)
                    pending.clear()
                    click.echo(f"(loaded {path}: {len(session.messages)} messages, {session.n_cells} cells"
                               + ("; its compacted cells cannot be recalled: saved files do not carry the store"
                                  if session.recall != "off" and (session.cache.kind == PACKED).any() else "") + ")",
                               err=True)
            except EdgeKVError as e:
                _echo_error(e.under(cap_option) if cap_option else e)
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
                _echo_error(e)
            continue
        if line.startswith("/"):
            click.echo(f"unknown command {line.split()[0]}; {HELP}", err=True)
            continue
        try:
            if not stream_turn(session, line, pending, gen, report, pending_videos, cap_option) and (
                    pending or pending_videos):
                if pending:
                    click.echo(f"({len(pending)} image(s) stay attached to the next message)", err=True)
                if pending_videos:
                    click.echo(f"({len(pending_videos)} video(s) stay attached to the next message)", err=True)
                continue
        except EdgeKVError as e:  # a bad image must not end the conversation
            _echo_error(e)
        pending, pending_videos = [], []


def _echo_error(e: EdgeKVError) -> None:
    for line in error_lines(e):
        click.echo(line, err=True)
