"""`edgekv caption`: batch captions as sidecar files or one JSONL, resumable, on one process or Ray.

Exit codes: 0 every input captioned (or already done), 1 at least one input failed (each failure is in
the JSONL's `error` field or the errors file, and the rest of the batch went on), 2 bad usage."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgekv.cli.options import (apply_kv_memory, kv_memory_option, method_options, model_options, sampling_options,
                                video_options)
from edgekv.errors import EdgeKVError


def _ray_address(ctx, param, value):
    """`--ray` alone starts a local Ray; `--ray ADDRESS` connects. Click gives an optional value the next
    word, so `--ray photos/` would swallow an input: refuse that with a hint."""
    if value is None or value in ("local", "auto") or "://" in value or ":" in value:
        return value
    raise click.BadParameter(f"{value!r} is not a Ray address (auto, host:port, ray://host:port); "
                             "to start a local Ray put --ray after the inputs or write --ray local")


@click.command()
@model_options
@method_options
@video_options
@kv_memory_option
@click.argument("inputs", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders of folder inputs (and ** in globs).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write one JSONL (file_name, text, ...) instead of sidecar files.")
@click.option("--caption-extension", default=".txt", show_default=True, help="Sidecar file extension.")
@click.option("--errors-file", type=click.Path(path_type=Path),
              help="Sidecar mode: where failures are logged (default: edgekv-caption-errors.jsonl in the "
                   "inputs' common folder).")
@click.option("--overwrite", is_flag=True, help="Caption every input again (default: skip what is done).")
@click.option("--prompt", help="Captioning prompt.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the prompt from a file.")
@click.option("--prefix", default="", help="Trigger word put in front of every caption ('sks' -> 'sks, ...').")
@sampling_options
@click.option("--no-progress", is_flag=True, help="No progress bar (it is off anyway when stderr is not a TTY).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              callback=_ray_address,
              help="Run on Ray Data: alone, a local Ray; with ADDRESS (auto, ray://host:10001), that cluster.")
@click.option("--concurrency", type=click.IntRange(1), default=1, show_default=True,
              help="Ray: number of actors (one loaded model each).")
@click.option("--num-gpus", type=click.FloatRange(0), default=0, show_default=True, help="Ray: GPUs per actor.")
def caption(model, mmproj, hf_repo, offline, model_opts, method, budget, compress, swa_budget, video_fps, video_max_frames, max_kv_cells, kv_memory, inputs,
            recursive, output, caption_extension, errors_file, overwrite, prompt, prompt_file, prefix, max_tokens,
            temperature, top_p, top_k, min_p, stops, seed, no_progress,
            ray_address, concurrency, num_gpus):
    """Caption images and videos in folders, globs or @list.txt files; resumes where a run stopped.

    Exit code 0: all captioned; 1: some inputs failed (logged, the rest went on); 2: bad usage."""
    from edgekv.caption.batch import Summary, plan
    from edgekv.caption.captioner import DEFAULT_PROMPT, DEFAULT_VIDEO_PROMPT, CaptionConfig
    from edgekv.caption.inputs import collect_inputs, kind_of
    from edgekv.caption.sinks import ERRORS_NAME, JsonlSink, SidecarSink

    if prompt is not None and prompt_file is not None:
        raise EdgeKVError("use either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        prompt = prompt_file.read_text(encoding="utf-8").strip()
        if not prompt:
            raise EdgeKVError(f"the prompt file {prompt_file} is empty")
    from edgekv.runtime.video import check_sampling

    check_sampling(video_fps, video_max_frames)  # MediaError: one Error line, not a failure per video
    if ray_address is None and (concurrency != 1 or num_gpus):
        raise EdgeKVError("--concurrency and --num-gpus are Ray options: add --ray [ADDRESS]")
    if output is not None and errors_file is not None:
        raise EdgeKVError("--errors-file is for sidecar mode; with -o failures are records with an `error` field")

    images = collect_inputs(inputs, recursive)
    if not images:
        raise EdgeKVError(f"no images or videos found in {' '.join(inputs)}"
                          + ("" if recursive else " (sub-folders need --recursive)"))
    if output is not None:
        sink = JsonlSink(output)
    else:
        if errors_file is None:
            errors_file = Path(os.path.commonpath([str(p.parent) for p in images])) / ERRORS_NAME
        sink = SidecarSink(caption_extension, errors_file)
    try:
        for note in sink.notes:
            click.echo(note, err=True)
        todo, skipped = plan(images, sink, overwrite)
        summary = Summary(total=len(images), skipped=skipped,
                          unit="files" if any(kind_of(p) == "video" for p in images) else "images")
        if todo:
            model_path, mmproj_path = _resolve_model(model, mmproj, hf_repo, offline)
            cap_option = "--max-kv-cells"   # what sets the context when it is capped (a hint names it)
            if kv_memory is not None:   # cache types, budget and (as --max-kv-cells) the context from one knob
                model_opts, budget, cells, picked, swa_budget = apply_kv_memory(
                    kv_memory, model_opts, budget, (model_path, mmproj_path), swa_budget)
                if max_kv_cells is None and cells is not None:
                    max_kv_cells, cap_option = cells, "--kv-memory"
                click.echo(f"edgekv: {picked}; context {max_kv_cells or model_opts.n_ctx} cells", err=True)
            if ray_address is not None and model_opts.threads is None:
                model_opts = model_opts.with_(threads=max(1, (os.cpu_count() or 1) // concurrency))
            cfg = CaptionConfig(model=str(model_path), mmproj=str(mmproj_path) if mmproj_path else None,
                                model_options=model_opts, method=method, budget=budget, compress=compress,
                                swa_budget=swa_budget,
                                prompt=prompt or DEFAULT_PROMPT, prefix=prefix, max_tokens=max_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                stop=list(stops), seed=seed, video_prompt=prompt or DEFAULT_VIDEO_PROMPT,
                                video_fps=video_fps, video_max_frames=video_max_frames, max_kv_cells=max_kv_cells,
                                cap_option=cap_option)
            click.echo(f"captioning {len(todo)} of {len(images)} input(s) ({skipped} already done)", err=True)
            if ray_address is None:
                _run_single(cfg, todo, sink, summary, not no_progress)
            else:
                _run_ray(cfg, todo, sink, summary, not no_progress, ray_address, concurrency, num_gpus)
        else:
            click.echo(f"nothing to do: all {len(images)} input(s) already captioned (--overwrite redoes them)",
                       err=True)
    finally:
        sink.close()
    for line in summary.lines():
        click.echo(line, err=True)
    if summary.failed:
        where = output if output is not None else sink.errors_path
        click.echo(f"{summary.failed} input(s) failed; see {where}", err=True)
        sys.exit(1)


def _resolve_model(model, mmproj, hf_repo, offline) -> tuple[Path, Path]:
    from edgekv.cli.options import resolve_model_paths
    from edgekv.errors import ModelLoadError
    from edgekv.runtime.model import check_gguf

    model, mmproj = resolve_model_paths(model, mmproj, hf_repo, offline)
    check_gguf(model, "model")   # here, not first in every Ray actor
    if not mmproj:
        raise ModelLoadError("captioning needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    check_gguf(mmproj, "mmproj")
    return model, mmproj


def _run_single(cfg, todo, sink, summary, show_progress: bool) -> None:
    from edgekv.caption.batch import run_local
    from edgekv.caption.captioner import Captioner

    with Captioner(cfg) as captioner:
        run_local(captioner, todo, sink, summary, show_progress)


def _run_ray(cfg, todo, sink, summary, show_progress: bool, address: str, concurrency: int, num_gpus: float) -> None:
    import time

    from edgekv.caption.batch import DELAY_ENV, progress_bar
    from edgekv.caption.ray_runner import caption_with_ray, init_ray

    init_ray(address, num_cpus=None)
    delay = float(os.environ.get(DELAY_ENV) or 0)
    t0 = time.perf_counter()
    with progress_bar(len(todo), show_progress, summary.unit) as bar:
        def on_record(path, rec, worker, rss):
            if delay:
                time.sleep(delay)
            rec = sink.write(path, rec)
            summary.add(sink.key(path), rec)
            summary.peak_rss_mb[worker] = max(rss, summary.peak_rss_mb.get(worker, 0.0))
            bar.update(1)

        caption_with_ray(todo, cfg.to_dict(), concurrency=concurrency, num_gpus=num_gpus,
                         num_cpus=cfg.model_options.threads if not num_gpus else None, on_record=on_record)
    summary.seconds += time.perf_counter() - t0
