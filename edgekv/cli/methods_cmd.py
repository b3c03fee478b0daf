"""`edgekv methods`: every compression method, one line each."""
from __future__ import annotations

import sys

import click


def summary(method) -> str:
    """First line of the class docstring, or of its module's when the class has only dataclass's stub."""
    cls = type(method)
    doc = (cls.__doc__ or "").strip()
    if not doc or doc.startswith(cls.__name__ + "("):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


@click.command()
def methods():
    """List the compression methods with what they need and their paper."""
    from edgekv.methods import METHODS, get_method

    for name in sorted(METHODS):
        m = get_method(name)
        need = "either" if hasattr(m, "resolve") else ("query window" if m.needs_queries else "query-agnostic")
        click.echo(f"{name:<16} {need:<15} {summary(m)}" + (f"  {m.paper}" if m.paper else ""))
