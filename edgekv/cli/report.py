"""The short report printed after an answer (to stderr, so stdout holds only the answer)."""
from __future__ import annotations

import click


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def format_report(session, last=None, reports=None) -> str:
    """Media tokens, KV cells and bytes before -> after, compaction time, speeds, peak RSS.

    reports: the compactions to show (one turn's); None = every compaction of the conversation."""
    lines = []
    this_turn = reports is not None
    reports = session.reports if reports is None else list(reports)
    media = sum(r.n_candidates for r in reports)
    for r in reports:
        pct = 100 * r.cells_after / r.cells_before if r.cells_before else 100
        lines.append(f"method      {r.method}   budget {r.budget_cells} cells/head of {r.n_candidates}"
                     + (f"   (nominal mean {r.nominal_mean:.0f}, max {r.nominal_max})" if r.nominal_max != r.budget_cells else "")
                     + ("   merged" if r.merged else "")
                     + (f"   query window {r.window}" if r.window else "   query-agnostic"))
        lines.append(f"KV cells    {r.cells_before} -> {r.cells_after} ({pct:.0f}%)")
        lines.append(f"KV bytes    {human_bytes(r.bytes_before)} -> {human_bytes(r.bytes_after)} "
                     f"({100 * r.ratio:.0f}%)")
        lines.append(f"compaction  {1000 * r.seconds:.1f} ms (plan {1000 * r.plan_seconds:.1f} ms)")
    if not reports:
        lines.append("KV cells    " + f"{session.n_cells} ("
                     + ("nothing compacted this turn)" if this_turn and session.reports else "not compacted)"))
    lines.insert(0, f"media tokens {media}")
    if last is not None:  # this turn's figures: prompt prefilled now, answer decoded now
        lines.append(f"prefill     {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s   "
                     f"decode {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s")
        lines.append(f"peak RSS    {last.peak_memory_mb:.0f} MB")
    return "\n".join(lines)


def echo_report(session, last=None, reports=None) -> None:
    click.secho("\n--- edgekv " + "-" * 40, err=True, dim=True)
    click.echo(format_report(session, last, reports), err=True)
