"""`edgekv` root group. Every EdgeKVError becomes one clear line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from edgekv import __version__  # noqa: E402
from edgekv.errors import EdgeKVError, error_lines  # noqa: E402


class EdgeKVGroup(click.Group):
    """Turns user-facing errors into messages instead of tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeKVError as e:
            for line in error_lines(e):  # llama.cpp's log first: the Error line is the last one
                click.echo(line, err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)


@click.group(cls=EdgeKVGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekv")
def cli() -> None:
    """edgekv: run multimodal GGUF models with a compressed KV cache (llama.cpp)."""


def _register() -> None:
    from edgekv.cli.caption import caption
    from edgekv.cli.chat import chat
    from edgekv.cli.demo import demo
    from edgekv.cli.info import info
    from edgekv.cli.methods_cmd import methods
    from edgekv.cli.models_cmd import models
    from edgekv.cli.serve import serve

    for cmd in (chat, caption, serve, demo, info, methods, models):
        cli.add_command(cmd)
    try:
        from edgekv.cli.eval_cmd import eval_command
    except ImportError:  # the eval extra is optional
        return
    cli.add_command(eval_command, name="eval")


_register()


def main() -> None:
    cli(prog_name="edgekv")


if __name__ == "__main__":
    main()
