"""`edgekv methods`: every compression method, one line each."""
from __future__ import annotations

import click


@click.command()
def methods():
    """List the compression methods with what they need and their paper."""
    from edgekv.methods import METHODS, get_method

    for name in sorted(METHODS):
        m = get_method(name)
        doc = (type(m).__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else ""
        need = "query window" if getattr(m, "needs_queries", False) else "query-agnostic"
        click.echo(f"{name:<16} {need:<15} {summary}" + (f"  {m.paper}" if m.paper else ""))
