"""The short report printed after an answer (to stderr, so stdout holds only the answer)."""
from __future__ import annotations

import click


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def format_report(session, last=None, reports=None, media: int | None = None) -> str:
    """Media tokens, KV cells and bytes before -> after, compaction time, speeds, peak RSS.

    reports: the compactions to show (one turn's); None = every compaction of the conversation.
    media: the media tokens prefilled (chunk by chunk: the streaming hook's count, as the video line's);
    None = the compactions' candidates, which is the media when the whole cache was compacted at once
    (a chunk's compaction leaves its last cell out of the candidates: llama.cpp needs that pos_max)."""
    lines = []
    this_turn = reports is not None
    reports = session.reports if reports is None else list(reports)
    if media is None:
        hook = session.after_media_chunk
        media = (hook.media_tokens if not this_turn and hasattr(hook, "media_tokens")
                 else sum(r.n_candidates for r in reports))
    for run in _runs(reports):
        if len(run) > 1:
            lines += _run_lines(run)
            continue
        r = run[0]
        pct = 100 * r.cells_after / r.cells_before if r.cells_before else 100
        lines.append(f"method      {r.method}   budget {r.budget_cells} cells/head of {r.n_candidates}"
                     + (f"   (nominal mean {r.nominal_mean:.0f}, max {r.nominal_max})" if r.nominal_max != r.budget_cells else "")
                     + ("   merged" if r.merged else "")
                     + (f"   query window {r.window}" if r.window else "   query-agnostic"))
        lines.append(f"KV cells    {r.cells_before} -> {r.cells_after} ({pct:.0f}%)"
                     + (f"; sliding-window layers {r.info['swa_cells_before']} -> {r.info['swa_cells_after']}"
                        if "swa_cells_after" in r.info else ""))
        lines.append(f"KV bytes    {human_bytes(r.bytes_before)} -> {human_bytes(r.bytes_after)} "
                     f"({100 * r.ratio:.0f}%{_of_f16(session, r)})")
        lines.append(f"compaction  {1000 * r.seconds:.1f} ms (plan {1000 * r.plan_seconds:.1f} ms)")
        if r.store_where is not None:
            lines.append(recall_line(r))
    if not reports:
        lines.append("KV cells    " + f"{session.n_cells} ("
                     + ("nothing compacted this turn)" if this_turn and session.reports else "not compacted)"))
    vs = _vs_full_f16(session)
    if vs:
        lines.append(vs)
    lines.insert(0, f"media tokens {media}")
    if last is not None:  # this turn's figures: prompt prefilled now, answer decoded now
        lines.append(f"prefill     {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s   "
                     f"decode {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s")
        lines.append(f"peak RSS    {last.peak_memory_mb:.0f} MB")
    return "\n".join(lines)


def recall_line(r) -> str:
    """The recall store after a compaction, and what this question's re-selection did."""
    where = "in RAM" if r.store_where == "RAM" else "on disk"
    line = f"recall      store {r.store_cells} cells, {human_bytes(r.store_bytes)} {where}"
    share = r.info.get("recall_share")
    if r.reselect and r.rewritten:
        line += (f"; this question brought back {r.recalled} cells"
                 + (f", {r.reprefill_tokens} question tokens prefilled again" if r.reprefill_tokens else ""))
    elif r.reselect and share:   # the gate (--recall-min-share): what would have come back held too little
        line += (f"; this question kept the context's cells (what would come back held {share:.2f} of a "
                 "head's attention, under --recall-min-share)")
    elif r.reselect:
        line += "; this question kept the context's cells (nothing rewritten)"
    return line


def _quantized(session) -> tuple[str, str] | None:
    m = getattr(session, "model", None)
    k, v = getattr(m, "cache_type_k", "f16"), getattr(m, "cache_type_v", "f16")
    return None if (k, v) == ("f16", "f16") else (k, v)


def _of_f16(session, r) -> str:
    """On a quantized cache (-ctk/-ctv, --kv-memory): the bytes after as a share of the cells before at f16."""
    kv = _quantized(session)
    if kv is None or not r.bytes_before:
        return ""
    f16 = r.bytes_before * session.model.layout.bytes_per_cell() / session.model.layout.bytes_per_cell(*kv)
    return f"; {100 * r.bytes_after / f16:.0f}% of those cells at f16"


def _vs_full_f16(session) -> str | None:
    """On a quantized cache: the cache now against the full f16 cache of every cell prefilled so far (the
    compacted ones too), every layer holding every cell."""
    if _quantized(session) is None:
        return None
    from edgekv.kv_memory import full_f16_bytes

    n = session.n_cells + sum(r.cells_before - r.cells_after for r in session.reports)
    full = full_f16_bytes(session.model.layout, n)
    now = session.kv_bytes()
    return (f"KV vs f16   {human_bytes(now)} ({'/'.join(_quantized(session))}) = {100 * now / full:.0f}% of the "
            f"full f16 cache of the {n} cells prefilled ({human_bytes(full)})")


def echo_report(session, last=None, reports=None, media: int | None = None) -> None:
    click.secho("\n--- edgekv " + "-" * 40, err=True, dim=True)
    click.echo(format_report(session, last, reports, media), err=True)


def _runs(reports) -> list[list]:
    """Consecutive query-agnostic compactions by the same method (a video or several images compacted
    chunk by chunk) grouped, so the report stays a few lines."""
    runs: list[list] = []
    for r in reports:
        if runs and r.window == 0 and runs[-1][-1].window == 0 and runs[-1][-1].method == r.method:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _run_lines(run) -> list[str]:
    top = max(run, key=lambda r: r.cells_before)
    last = run[-1]
    return [f"method      {last.method} x {len(run)} chunks   budget {sum(r.budget_cells for r in run)} cells/head "
            f"of {sum(r.n_candidates for r in run)}   query-agnostic",
            f"KV cells    at most {top.cells_before} before a chunk's compaction, {last.cells_after} after the last",
            f"KV bytes    at most {human_bytes(top.bytes_before)}, {human_bytes(last.bytes_after)} after the last",
            f"compaction  {1000 * sum(r.seconds for r in run):.1f} ms in all "
            f"(plan {1000 * sum(r.plan_seconds for r in run):.1f} ms)"]
