"""`edgekv models`: the registry of known model repos (short names for -hf)."""
from __future__ import annotations

import click


@click.command(short_help="Known model repos: short names for -hf.")
def models() -> None:
    """List known model repos: short names for -hf (e.g. -hf gemma3-4b)."""
    from edgekv.runtime.registry import known_models

    known = known_models()
    width = max(len(n) for n in known)
    click.echo(f"{'name':<{width}}  {'-hf resolves to':<44} {'layout':<12} status")
    for k in known.values():
        layout = ", ".join(x for x, on in (("M-RoPE", k.mrope), ("iSWA", k.iswa)) if on) or "plain"
        click.echo(f"{k.name:<{width}}  {k.spec:<44} {layout:<12} {k.status}")
        click.echo(f"{'':<{width}}  mmproj {k.mmproj}; {k.template}")
