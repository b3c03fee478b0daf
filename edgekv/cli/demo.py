"""`edgekv demo`: the whole pipeline offline on a tiny synthetic model + mmproj pair (random weights, so
the answer is gibberish; the point is the cells, bytes and speeds in the report)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from edgekv.cli.options import BudgetType, method_choice, seed_option
from edgekv.cli.chat import stream_turn


@click.command()
@click.option("--variant", type=click.Choice(["llava", "llava-tiles", "qwen2vl"]), default="llava-tiles",
              show_default=True, help="Tiny pair: llava (256 tokens/image), llava-tiles (2560 tokens for a "
                                      "672x672 image), qwen2vl (M-RoPE).")
@click.option("--method", default="auto", show_default=True, type=method_choice())
@click.option("--budget", type=BudgetType(), default="0.25", show_default=True)
@click.option("--save-models", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the generated pair (and test image) here, to try `edgekv chat -m ... --mmproj ...`.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=16, show_default=True)
@click.option("-t", "--threads", type=click.IntRange(1), default=2, show_default=True)
@seed_option("Seed of the generated weights, test image and sampling.")
def demo(variant, method, budget, save_models, max_tokens, threads, seed):
    """Run prefill -> compaction -> decode offline on a generated tiny model."""
    from edgekv.runtime import Model, Session
    from edgekv.testing.tiny import VARIANTS, build_pair, make_test_image

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(save_models) if save_models else Path(tmp)
        model_path, mmproj_path = build_pair(variant, out, seed=seed)
        w, h = VARIANTS[variant]["test_image"]
        image = out / f"{variant}-test.png"
        image.write_bytes(make_test_image(w, h, seed=seed))
        click.echo(f"tiny {variant} pair: {model_path.name} + {mmproj_path.name}, image {w}x{h}", err=True)
        with Model.load(model_path, mmproj_path, n_ctx=4096, n_batch=2048, threads=threads,
                        flash_attn="off") as m:
            s = Session(m, method=method, budget=budget, seed=seed)
            stream_turn(s, "Describe the image.", [image], {"max_tokens": max_tokens}, report=True)
            s.close()
        if save_models:
            click.echo(f"\nsaved to {out}; try:\n  edgekv chat -m {model_path} --mmproj {mmproj_path} "
                       f"--image {image} -p \"describe\" --method snapkv --budget 0.25", err=True)
