"""Video in `edgekv chat`: the report lines (frames, seconds of video, peak KV cells re-read from llama.cpp's
state). Sizing the context and checking a clip fits live in `edgekv.runtime.sizing`."""
from __future__ import annotations

import click

from edgekv.runtime.streaming import ChunkCompactor


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
