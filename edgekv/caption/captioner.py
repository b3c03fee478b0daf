"""The per-image engine: one loaded model, one Session, and the chat prefix that every image shares
prefilled once.

A caption prompt renders as `<head><image marker>\n<prompt><assistant header>`; `head` (BOS, the system
text, the template up to the marker) is the same for every image, so it is prefilled once and its cache
restored (`Session.snapshot()/restore()`) before each image instead of being prefilled again. The text
after the marker (the caption prompt and the assistant header) is the observation window whose queries
a query-aware method (`auto`, snapkv, ...) scores the image cells with: the captioning prompt is fixed
before any image is evaluated, so every image is compacted for the question that will be asked.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgekv.caption.inputs import IMAGE_EXTENSIONS, kind_of
from edgekv.errors import EdgeKVError, MediaError

DEFAULT_PROMPT = "Write a one-paragraph caption for this image."


@dataclass
class CaptionConfig:
    """Everything a worker needs to build a Captioner (plain values: it travels to Ray actors)."""

    model: str
    mmproj: str | None = None
    n_ctx: int = 4096
    n_batch: int = 512
    n_gpu_layers: int = 0
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    threads: int | None = None
    image_max_tokens: int | None = None
    method: str = "auto"
    budget: float | int | str = 0.25
    compress: str = "media"
    prompt: str = DEFAULT_PROMPT
    system: str | None = None
    prefix: str = ""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    reuse_prefix: bool = True   # False: the naive loop (prefill everything per image), for benchmarks

    def to_dict(self) -> dict:
        return asdict(self)


def with_prefix(prefix: str, caption: str) -> str:
    """`--prefix sks` -> "sks, <caption>"; a prefix ending in a space, comma or newline is used as is."""
    if not prefix:
        return caption
    if prefix[-1] in " ,\n\t":
        return prefix + caption
    return f"{prefix}, {caption}"


class Captioner:
    """Caption one image at a time with one loaded model. `caption()` never raises for a bad input: it
    returns a record with an `error` field instead."""

    def __init__(self, config: CaptionConfig) -> None:
        from edgekv.methods import uses_queries
        from edgekv.runtime import Model, Session
        from edgekv.runtime.lib import mtmd_cpp

        self.config = c = config
        self.model = Model.load(c.model, c.mmproj, n_ctx=c.n_ctx, n_batch=c.n_batch, n_gpu_layers=c.n_gpu_layers,
                                threads=c.threads, flash_attn=c.flash_attn, cache_type_k=c.cache_type_k,
                                cache_type_v=c.cache_type_v, image_max_tokens=c.image_max_tokens,
                                capture_queries=uses_queries(c.method))
        try:
            if self.model.mtmd is None:
                raise EdgeKVError("captioning needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
            self.session = Session(self.model, method=c.method, budget=c.budget, compress=c.compress, seed=c.seed)
            marker = mtmd_cpp.mtmd_default_marker().decode()
            msgs = [{"role": "system", "content": c.system}] if c.system else []
            msgs.append({"role": "user", "content": f"{marker}\n{c.prompt}"})
            full = self.session.format_chat(msgs, add_assistant=True)
            cut = full.find(marker)
            if cut < 0:
                raise EdgeKVError("the chat template dropped the image marker; cannot caption with this model")
            self.full_prompt = full
            self.head, self.tail = full[:cut], full[cut:]
            self._snap = None
            self.head_tokens = 0
            if c.reuse_prefix and self.head:
                self.session.append_text(self.head)
                self.head_tokens = self.session.n_cells
                self._snap = self.session.snapshot()
        except BaseException:
            self.close()
            raise
        self.model_name = Path(c.model).name

    def _prefill(self, image: Path) -> None:
        s = self.session
        s.reports.clear()
        if self._snap is not None:
            s.restore(self._snap)       # the shared head, as prefilled once
            s.append_prompt(self.tail, [image])
        else:
            s.clear()
            s.append_prompt(self.full_prompt, [image])
        s.compact()

    def caption(self, image: Path) -> dict:
        """The JSONL record for one image (without file_name): text and figures, or `error`."""
        c = self.config
        t0 = time.perf_counter()
        base = {"model": self.model_name, "method": c.method, "budget": c.budget}
        try:
            kind = kind_of(image)
            if kind == "video":  # hook for the video branch
                raise MediaError("video captioning is not available yet")
            if kind is None:
                raise MediaError(f"unsupported file type {image.suffix or '(none)'!r}: edgekv caption reads "
                                 f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}")
            self._prefill(image)
            rep = self.session.reports[0] if self.session.reports else None
            cells_before = rep.cells_before if rep else self.session.n_cells
            cells_after = rep.cells_after if rep else self.session.n_cells
            parts, last = [], None
            for r in self.session.generate(max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p,
                                           top_k=c.top_k, min_p=c.min_p, stop=tuple(c.stop), seed=c.seed):
                parts.append(r.text)
                last = r
            text = with_prefix(c.prefix, "".join(parts).strip())
            return {**base, "method": rep.method if rep else c.method, "text": text,
                    "tokens": last.generation_tokens if last else 0,
                    "finish_reason": last.finish_reason if last else None,
                    "kv_cells_before": cells_before, "kv_cells_after": cells_after,
                    "seconds": round(time.perf_counter() - t0, 4)}
        except Exception as e:  # one bad input never ends the batch
            msg = str(e).strip() if isinstance(e, EdgeKVError) else f"{type(e).__name__}: {e}"
            return {**base, "error": msg or type(e).__name__, "seconds": round(time.perf_counter() - t0, 4)}

    def close(self) -> None:
        s = getattr(self, "session", None)
        if s is not None:
            s.close()
            self.session = None
        m = getattr(self, "model", None)
        if m is not None:
            m.close()
            self.model = None

    def __enter__(self) -> "Captioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
