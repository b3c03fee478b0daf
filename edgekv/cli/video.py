"""Video in `edgekv chat`: sizing the context for the clips, checking a clip fits before a turn starts,
and the report lines (frames, seconds of video, peak KV cells re-read from llama.cpp's state)."""
from __future__ import annotations

import click

from edgekv.errors import ContextOverflowError
from edgekv.methods import parse_budget, resolve_budget
from edgekv.runtime.media import load_image
from edgekv.runtime.streaming import ChunkCompactor, _group_cost, plan_video

SLACK = 64  # cells for the chat template's own tokens around the prompt


def _text_cells(model, prompt: str, max_tokens: int) -> int:
    return len(model.tokenize(prompt)) + max_tokens + SLACK


def context_for(model, clips, images, budget, prompt: str, max_tokens: int) -> int:
    """Cells the first turn needs when every media chunk is compacted right after its prefill: the kept
    budget of each clip and image + the largest chunk + the text (timestamps, prompt, answer)."""
    kept, chunk, text = 0, 0, _text_cells(model, prompt, max_tokens)
    for v in clips:
        p = plan_video(model, v, budget)
        kept += p.budget_cells + p.groups
        chunk = max(chunk, p.chunk_tokens)
        text += p.text_tokens
    for im in images:
        rgb = load_image(im)
        media, t, n_chunks = _group_cost(model, rgb.width, rgb.height, 1)
        kept += resolve_budget(parse_budget(budget), media) + n_chunks
        chunk = max(chunk, media // max(1, n_chunks))
        text += t
    return kept + chunk + text


def check_fits(session, clips, prompt: str, max_tokens: int, lower_budget: bool = False) -> None:
    """Fail before the turn (nothing in the cache changes) when the clips cannot fit the free cells.
    lower_budget (--max-kv-cells): instead of failing, lower each clip's budget until it fits."""
    free = session.model.n_ctx - session.n_cells - _text_cells(session.model, prompt, max_tokens)
    for v in clips:
        if lower_budget:
            p = plan_video(session.model, v, session.budget, free_cells=free)
            v.budget = p.ratio
        else:
            p = plan_video(session.model, v, session.budget)
            if p.budget_cells + p.groups + p.text_tokens + p.chunk_tokens > free:
                raise ContextOverflowError(
                    f"{v.name}: {p.frames} frames keep {p.budget_cells + p.groups + p.text_tokens} cells + one "
                    f"chunk of {p.chunk_tokens}, but only {max(free, 0)} of {session.model.n_ctx} cells are free; "
                    "lower --budget or --video-max-frames, or pass --max-kv-cells to fit the budget to it")
        free -= p.budget_cells + p.groups + p.text_tokens


def echo_video_report(session, stats, report: bool) -> str | None:
    """Print each clip's line and the peak; return the damage message of a clip that broke, if any."""
    hook = session.after_media_chunk
    if report and stats:
        for s in stats:
            click.echo(f"video       {s.name}: {s.frames} frames, {s.seconds:.1f} s of video, {s.media_tokens} "
                       f"media tokens in {s.chunks} chunks, {s.frames_per_s:.1f} frames/s "
                       f"(compaction {s.compact_seconds:.2f} s)", err=True)
        if isinstance(hook, ChunkCompactor):
            # B: the cells kept once everything is in (compacted media + text + answer), re-read now from
            # llama.cpp's state; P: the most the state held, re-read before each chunk's compaction.
            final = hook.observe(session)
            peak = max([final] + [s.peak_cells for s in stats])  # this turn's clips
            chunk = max(s.chunk_cells for s in stats)
            click.echo(f"peak KV cells {peak} (budget {final} + chunk {chunk})   n_ctx {session.model.n_ctx}",
                       err=True)
    damaged = [s.error for s in stats if s.error]
    return "; ".join(damaged) if damaged else None
