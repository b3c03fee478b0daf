"""Sizing a context for media compacted chunk by chunk (video clips, images under --max-kv-cells), and
checking a clip fits the free cells before a turn starts. Used by `edgekv chat` and `edgekv caption`."""
from __future__ import annotations

from edgekv.errors import ContextOverflowError
from edgekv.methods import parse_budget, resolve_budget
from edgekv.runtime.media import load_image
from edgekv.runtime.streaming import group_cost, plan_video

SLACK = 64  # cells for the chat template's own tokens around the prompt


def _text_cells(model, prompt: str, max_tokens: int) -> int:
    return len(model.tokenize(prompt)) + max_tokens + SLACK


def context_for(model, clips, images, budget, prompt: str, max_tokens: int) -> int:
    """Cells the first turn needs when every media chunk is compacted right after its prefill: the kept
    budget of each clip and image + the largest chunk + the text (timestamps, prompt, answer)."""
    kept, chunk, text = 0, 0, _text_cells(model, prompt, max_tokens)
    for v in clips:
        p = plan_video(model, v, budget)
        kept += p.budget_cells + p.groups
        chunk = max(chunk, p.chunk_tokens)
        text += p.text_tokens
    for im in images:
        rgb = load_image(im)
        media, t, n_chunks = group_cost(model, rgb.width, rgb.height, 1)
        kept += resolve_budget(parse_budget(budget), media) + n_chunks
        chunk = max(chunk, media // max(1, n_chunks))
        text += t
    return kept + chunk + text


def check_fits(session, clips, prompt: str, max_tokens: int, lower_budget: bool = False) -> None:
    """Fail before the turn (nothing in the cache changes) when the clips cannot fit the free cells.
    lower_budget (--max-kv-cells): instead of failing, lower each clip's budget until it fits."""
    free = session.model.n_ctx - session.n_cells - _text_cells(session.model, prompt, max_tokens)
    for v in clips:
        if lower_budget:
            p = plan_video(session.model, v, session.budget, free_cells=free)
            v.budget = p.ratio
        else:
            p = plan_video(session.model, v, session.budget)
            if p.budget_cells + p.groups + p.text_tokens + p.chunk_tokens > free:
                raise ContextOverflowError(
                    f"{v.name}: {p.frames} frames keep {p.budget_cells + p.groups + p.text_tokens} cells + one "
                    f"chunk of {p.chunk_tokens}, but only {max(free, 0)} of {session.model.n_ctx} cells are free; "
                    "lower --budget or --video-max-frames, or pass --max-kv-cells to fit the budget to it")
        free -= p.budget_cells + p.groups + p.text_tokens
