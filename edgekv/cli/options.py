"""Options shared by commands (llama.cpp's flag names where they exist), and click types that check
their values so the user sees one clear line."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from edgekv.errors import BudgetError, ModelLoadError

CACHE_TYPES = ["f16", "bf16", "q8_0", "q4_0", "f32"]


class BudgetType(click.ParamType):
    name = "BUDGET"

    def convert(self, value, param, ctx):
        from edgekv.methods import parse_budget

        try:
            return parse_budget(value)
        except BudgetError as e:
            self.fail(str(e), param, ctx)


class ImagePath(click.ParamType):
    """An existing, readable file (decoded later by Pillow with its own clear errors)."""

    name = "IMAGE"

    def convert(self, value, param, ctx):
        p = Path(value).expanduser()
        if not p.exists():
            self.fail(f"image not found: {p}", param, ctx)
        if not p.is_file():
            self.fail(f"not a file: {p}", param, ctx)
        if not os.access(p, os.R_OK):
            self.fail(f"cannot read {p}", param, ctx)
        return p


def template_name_option(ctx, param, value):
    """--chat-template: one of llama.cpp's built-in names, checked before anything loads."""
    if value is None:
        return None
    from edgekv.errors import EdgeKVError
    from edgekv.runtime.template import check_template_name

    try:
        return check_template_name(value)
    except EdgeKVError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def method_choice() -> click.Choice:
    from edgekv.methods import METHODS

    return click.Choice(sorted(METHODS), case_sensitive=False)


def model_options(f):
    """-m/--mmproj/-hf and the llama.cpp context knobs."""
    opts = [
        click.option("-m", "--model", "model", type=click.Path(dir_okay=False, path_type=Path), envvar="EDGEKV_MODEL",
                     help="Text model GGUF."),
        click.option("--mmproj", type=click.Path(dir_okay=False, path_type=Path), envvar="EDGEKV_MMPROJ",
                     help="Multimodal projector GGUF (needed for images)."),
        click.option("-hf", "--hf-repo", "hf_repo", metavar="OWNER/REPO[:QUANT]",
                     help="Model and mmproj from a Hugging Face repo (downloaded once, then cached)."),
        click.option("--offline", is_flag=True, help="Use the Hugging Face cache only (like HF_HUB_OFFLINE=1)."),
        click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(16), default=4096, show_default=True,
                     help="Context size in cells."),
        click.option("-b", "--batch-size", "n_batch", type=click.IntRange(1), default=512, show_default=True,
                     help="Prefill batch (an image chunk must fit one batch)."),
        click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, default=0, show_default=True,
                     help="Layers to offload to the GPU."),
        click.option("-fa", "--flash-attn", "flash_attn", type=click.Choice(["auto", "on", "off"]), default="auto",
                     show_default=True),
        click.option("-ctk", "--cache-type-k", "cache_type_k", type=click.Choice(CACHE_TYPES), default="f16",
                     show_default=True),
        click.option("-ctv", "--cache-type-v", "cache_type_v", type=click.Choice(CACHE_TYPES), default="f16",
                     show_default=True),
        click.option("-t", "--threads", type=click.IntRange(1), default=None, help="CPU threads (default: cores)."),
        click.option("--image-max-tokens", type=click.IntRange(1), default=None,
                     help="Cap the tokens of one image (dynamic-resolution projectors); compression comes after."),
        click.option("--chat-template", "chat_template", metavar="NAME", default=None, callback=template_name_option,
                     help="One of llama.cpp's built-in chat templates (chatml, gemma, llama3, ...) instead of "
                          "the model's own; models without one are formatted as ChatML."),
    ]

    @functools.wraps(f)
    def with_options(**kw):   # the context knobs arrive as one ModelOptions: `model_opts`
        from edgekv.runtime.options import ModelOptions

        return f(model_opts=ModelOptions(**{k: kw.pop(k) for k in MODEL_OPTION_NAMES}), **kw)

    return functools.reduce(lambda acc, o: o(acc), reversed(opts), with_options)


# the model_options flags that make up a ModelOptions (capture_queries is the command's to decide)
MODEL_OPTION_NAMES = ("n_ctx", "n_batch", "n_gpu_layers", "flash_attn", "cache_type_k", "cache_type_v", "threads",
                      "image_max_tokens", "chat_template")


def method_options(f):
    opts = [
        click.option("--method", default="auto", show_default=True, type=method_choice(),
                     help="Compression method (see `edgekv methods`)."),
        click.option("--budget", type=BudgetType(), default="0.25", show_default=True,
                     help="Ratio in (0, 1] of the media cells to keep, or an absolute cell count."),
        click.option("--compress", type=click.Choice(["media", "all"]), default="media", show_default=True,
                     help="Compress only image/frame spans, or every prompt token (text-only use)."),
        click.option("--swa-budget", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Sliding-window models (Gemma 3): share of the window layers' cells a compaction with "
                          "the question keeps, the same cells in every window layer (1: all, as llama.cpp)."),
    ]
    return functools.reduce(lambda acc, o: o(acc), reversed(opts), f)


def recall_options(f):
    """--recall, --recall-dir, --recall-type, --recall-min-share (docs/recall.md): where compacted cells'
    originals wait for the next question, which chooses among all of them."""
    opts = [
        click.option("--recall", type=click.Choice(["off", "ram", "disk"]), default="disk", show_default=True,
                     help="Keep compacted cells outside the context so each question can bring back what "
                          "it needs: in a temporary file (disk), in RAM, or not at all (off)."),
        click.option("--recall-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Folder of the --recall disk file (default: a temporary folder, removed at exit)."),
        click.option("--recall-type", type=click.Choice(["f16", "q8_0", "q4_0"]), default=None,
                     help="Store recalled rows as this type (default: the cache's own type, exact)."),
        click.option("--recall-min-share", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Bring cells back only when some KV head would get this share of the question's "
                          "attention from them (0: whenever the choice differs). [default: see docs/recall.md]"),
    ]
    return functools.reduce(lambda acc, o: o(acc), reversed(opts), f)


SEED_MAX = 2**32 - 1  # llama.cpp's samplers take a uint32 seed


def seed_option(help: str = "Sampling seed."):
    """--seed, checked by click (a negative seed was a traceback in numpy or llama.cpp's uint32)."""
    return click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True, help=help)


def sampling_options(f):
    """-n and llama.cpp's sampling knobs (greedy by default), shared by chat and caption."""
    opts = [
        click.option("-n", "--max-tokens", type=click.IntRange(1), default=256, show_default=True),
        click.option("--temp", "temperature", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="Sampling temperature (0 = greedy)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(0), default=0, show_default=True,
                     help="Sample from the k best (0 = off)."),
        click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="Drop tokens below min-p x the best token's probability (0 = off)."),
        click.option("--stop", "stops", multiple=True,
                     help="End the answer at this string (repeatable; never printed or written)."),
        seed_option(),
    ]
    return functools.reduce(lambda acc, o: o(acc), reversed(opts), f)


def resolve_model_paths(model, mmproj, hf_repo, offline) -> tuple[Path, Path | None]:
    """-m/--mmproj, or the files of a -hf repo (downloaded once, then cached)."""
    if hf_repo:
        if model:
            raise ModelLoadError("use either -m/--model or -hf, not both")
        from edgekv.runtime.hub import resolve

        model, hf_mmproj = resolve(hf_repo, offline=offline or None, notify=lambda m: click.echo(m, err=True))
        mmproj = mmproj or hf_mmproj
    if not model:
        raise ModelLoadError("no model: pass -m MODEL.gguf (and --mmproj for images) or -hf owner/repo")
    return Path(model), (Path(mmproj) if mmproj else None)


def load_model_from_options(model, mmproj, hf_repo, offline, options, **changes):
    """Resolve -hf, then Model.load with the ModelOptions (keywords change single options)."""
    from edgekv.runtime import Model

    return Model.load(*resolve_model_paths(model, mmproj, hf_repo, offline), options, **changes)


def video_options(f):
    """The video sampling and KV-cap options, shared by `chat` and `caption` (same names, same meaning)."""
    f = click.option("--max-kv-cells", type=click.IntRange(16), default=None,
                     help="Cap the KV cache at N cells: the context is N cells and every image/frame chunk is "
                          "compacted right after its prefill (video: the budget is lowered to fit).")(f)
    f = click.option("--video-max-frames", type=int, default=64, show_default=True,
                     help="At most this many frames per video, spread uniformly over the clip when the fps "
                          "gives more.")(f)
    f = click.option("--video-fps", type=float, default=1.0, show_default=True,
                     help="Frames sampled per second of video.")(f)
    return f


def kv_memory_option(f):
    """--kv-memory: one memory knob that picks the cache type and the budget (edgekv/kv_memory.py)."""
    return click.option("--kv-memory", "kv_memory", metavar="R", default=None,
                        help="KV memory as a ratio of the full f16 cache (0.25) or a size (300MB): edgekv picks the "
                             "cache type and budget from its measured front and sizes the context. --budget and "
                             "-ctk/-ctv given explicitly override the pick.")(f)


def _given(name: str) -> bool:
    """The user set this option (command line or environment), not its default."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                                   ParameterSource.ENVIRONMENT)


def apply_kv_memory(kv_memory: str | None, model_opts, budget, model_paths=None, swa_budget: float = 1.0):
    """--kv-memory -> (ModelOptions with the cache types, budget, context cells or None, what was picked as
    a line for stderr or None, the sliding-window block's share). Explicit --budget / -ctk / -ctv /
    --swa-budget win over the pick. The context cells: -c x
    the budget, as --max-kv-cells does (every image chunk compacted right after its prefill); None when the
    budget is 1 or a cell count (then the cache type alone shrinks the allocation). `model_paths` (model,
    mmproj) is needed for a size in bytes."""
    if kv_memory is None:
        return model_opts, budget, None, None, swa_budget
    from edgekv import kv_memory as km

    target = km.parse_kv_memory(kv_memory)
    # a size is a share of the full f16 cache of -c cells (that needs the model's layout)
    p = km.pick(target.ratio if target.ratio is not None else target.resolve(_full_f16_bytes(model_paths, model_opts)))
    k = model_opts.cache_type_k if _given("cache_type_k") else p.cache_type_k
    v = model_opts.cache_type_v if _given("cache_type_v") else p.cache_type_v
    b = budget if _given("budget") else p.budget
    swa = swa_budget if _given("swa_budget") else p.swa_budget
    opts = model_opts.with_(cache_type_k=k, cache_type_v=v)
    cells = km.sized_cells(opts.n_ctx, b) if isinstance(b, float) and b < 1 else None
    line = p.describe(target.text)
    over = [f"{n} {val}" for n, val, given in (("-ctk", k, _given("cache_type_k")), ("-ctv", v, _given("cache_type_v")),
                                               ("--budget", b, _given("budget")),
                                               ("--swa-budget", f"{swa:g}", _given("swa_budget"))) if given]
    if over:
        line += f"; given explicitly: {', '.join(over)}"
    return opts, b, cells, line + f"; using K {k}, V {v}, budget {b}" + (
        f", sliding-window block {swa:g}" if swa < 1 else ""), swa


def _full_f16_bytes(model_paths, model_opts) -> int:
    """The full f16 cache of -c cells for this model (a 16-cell load reads its layout)."""
    from edgekv import kv_memory as km
    from edgekv.runtime import Model

    if model_paths is None:
        raise ModelLoadError("--kv-memory as a size needs the model: pass -m")
    with Model.load(model_paths[0], None, n_ctx=16, n_batch=16, threads=1, capture_queries=False) as m:
        return km.full_f16_bytes(m.layout, model_opts.n_ctx)
