"""`edgekv info MODEL`: the KV layout edgekv sees."""
from __future__ import annotations

from pathlib import Path

import click

from edgekv.cli.options import template_name_option
from edgekv.cli.report import human_bytes


def _template_row(m) -> str:
    fallback = m.template_fallback()
    if fallback is not None:
        return f"ChatML fallback: {fallback} (choose one with --chat-template NAME)"
    return f"{m.template_name} (--chat-template)" if m.template_name else "from the GGUF"


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mmproj", type=click.Path(dir_okay=False, path_type=Path), help="Also check this projector.")
@click.option("-ctk", "--cache-type-k", "cache_type_k", default="f16", show_default=True)
@click.option("-ctv", "--cache-type-v", "cache_type_v", default="f16", show_default=True)
@click.option("--chat-template", "chat_template", metavar="NAME", default=None, callback=template_name_option,
              help="Show the layout with this llama.cpp built-in chat template instead of the model's own.")
def info(model, mmproj, cache_type_k, cache_type_v, chat_template):
    """Print a model's layout: layers, KV heads, head dim, sliding window, M-RoPE, bytes per cell."""
    from edgekv.runtime import Model

    with Model.load(model, mmproj, n_ctx=256, n_batch=256, threads=1, capture_queries=False,
                    flash_attn="on" if cache_type_v not in ("f16", "bf16", "f32") else "auto",
                    cache_type_k=cache_type_k, cache_type_v=cache_type_v, chat_template=chat_template) as m:
        lay = m.layout
        rows = [
            ("model", str(m.path)),
            ("architecture", lay.arch),
            ("parameters", f"{lay.n_params / 1e6:.1f} M"),
            ("layers", str(lay.n_layer)),
            ("attention heads", f"{lay.n_head} query, {lay.n_head_kv} KV (group {lay.n_head // max(lay.n_head_kv, 1)})"),
            ("head dim", f"K {lay.head_dim}, V {lay.head_dim_v}"),
            ("embedding", str(lay.n_embd)),
            ("sliding window", f"{lay.n_swa} on {sum(lay.swa_layers)} layers; {len(lay.global_layers)} global "
                               f"layers compressible" if lay.iswa else "none (all layers global)"),
            ("M-RoPE", "yes" if lay.mrope else "no"),
            ("context (trained)", str(lay.n_ctx_train)),
            ("vocabulary", str(lay.n_vocab)),
            (f"bytes per cell ({cache_type_k}/{cache_type_v})",
             f"{human_bytes(lay.bytes_per_cell(cache_type_k, cache_type_v))} in the compressible block"),
            ("chat template", _template_row(m)),
        ]
        if m.mtmd is not None:
            rows.append(("mmproj", f"{m.mmproj_path} (vision)"))
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"{k:<{w}}  {v}")
