"""`edgekv chat`: one-shot (-p) or an interactive REPL with /image, /clear, /stats, /exit."""
from __future__ import annotations

from pathlib import Path

import click

from edgekv.cli.options import ImagePath, load_model_from_options, method_options, model_options
from edgekv.cli.report import echo_report
from edgekv.errors import EdgeKVError

HELP = "commands: /image PATH (attach to the next message), /clear, /stats, /exit"


@click.command()
@model_options
@method_options
@click.option("--image", "images", type=ImagePath(), multiple=True, help="Image to attach (repeatable).")
@click.option("-p", "--prompt", help="One-shot prompt; without it, an interactive chat.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temp", "temperature", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-report", is_flag=True, help="Do not print the memory/speed report.")
def chat(model, mmproj, hf_repo, offline, n_ctx, n_batch, n_gpu_layers, flash_attn, cache_type_k, cache_type_v,
         threads, image_max_tokens, method, budget, compress, images, prompt, max_tokens, temperature, top_p,
         seed, no_report):
    """Chat about images with a compressed KV cache."""
    from edgekv.methods import uses_queries
    from edgekv.runtime import Session

    # A query-agnostic method never reads the question window: skip capturing it (one Python callback
    # per graph node otherwise, 0.3-1.5 % of decode time, and the window's own prefill batch).
    m = load_model_from_options(model, mmproj, hf_repo, offline, n_ctx=n_ctx, n_batch=n_batch,
                                n_gpu_layers=n_gpu_layers, threads=threads, flash_attn=flash_attn,
                                cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                image_max_tokens=image_max_tokens, capture_queries=uses_queries(method))
    if images and m.mtmd is None:
        raise EdgeKVError("--image needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    # one-shot: the question is known before the images are read, so early compaction probes with it
    session = Session(m, method=method, budget=budget, compress=compress, seed=seed,
                      probe=prompt if prompt is not None else True)
    gen = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    try:
        if prompt is not None:
            stream_turn(session, prompt, list(images), gen, not no_report)
        else:
            _repl(session, list(images), gen, not no_report)
    finally:
        session.close()
        m.close()


def stream_turn(session, prompt: str, images: list[Path], gen: dict, report: bool) -> None:
    """One user turn: stream the answer to stdout, then the report to stderr."""
    last = None
    for r in session.chat(prompt, images, **gen):
        click.echo(r.text, nl=False)
        last = r
    click.echo()
    if report:
        echo_report(session, last)


def _repl(session, images: list[Path], gen: dict, report: bool) -> None:
    click.echo(f"edgekv chat ({session.method_name}, budget {session.budget}). {HELP}", err=True)
    pending = list(images)
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
        if line.startswith("/"):
            click.echo(f"unknown command {line.split()[0]}; {HELP}", err=True)
            continue
        try:
            stream_turn(session, line, pending, gen, report)
        except EdgeKVError as e:  # a bad image must not end the conversation
            click.echo(f"Error: {e}", err=True)
        pending = []
