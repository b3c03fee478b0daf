"""The per-image engine: one loaded model, one Session, and the chat prefix that every image shares
prefilled once.

A caption prompt renders as `<head><image marker>\n<prompt><assistant header>`; `head` (BOS, the system
text, the template up to the marker) is the same for every image, so it is prefilled once and its cache
restored (`Session.snapshot()/restore()`) before each image instead of being prefilled again. The text
after the marker (the caption prompt and the assistant header) is the observation window whose queries
a query-aware method (`auto`, snapkv, ...) scores the image cells with: the captioning prompt is fixed
before any image is evaluated, so every image is compacted for the question that will be asked.

Videos render as `<head><timestamp><frame>...<timestamp><frame>\n<video prompt><assistant header>`: the same
head (restored the same way), then the clip streamed frame by frame (`streaming.append_video`), each chunk
compacted right after its prefill, as `edgekv chat --video` does. The prompt comes after the clip in the
cache but is known before the clip is read, so it is the probe window of those compactions (and of the
early compaction of a many-tile image): `runtime/probe.py` decodes the caption prompt (the text as given,
as `edgekv chat -p` does) after the media, scores with its queries and removes it exactly. The context is
sized per clip for budget + one chunk + text (`runtime.sizing.context_for`, rounded up to 256 cells so clips
of similar length share a size), and back to `n_ctx` for images; `Model.resize_context`
needs no live Session, so the Session is closed, the context resized, the head prefilled and snapshotted
again. A clip's context depends only on the clip and the options, never on the order of the batch, so a
caption is the same in any order and on any worker. With `max_kv_cells` the context is that many cells for
every input, each image or frame chunk is compacted after its prefill, and a clip's budget is lowered to
fit (as `chat --max-kv-cells`).

A stream that breaks half-way (decoder error, truncated file) is captioned from the frames read before the
damage and the record gets a `warning` (where it stopped); it counts as done. A clip that cannot be opened
or has no decodable frame is a failed input (`error`), like a corrupt image.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgekv.caption.inputs import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, kind_of
from edgekv.errors import ContextOverflowError, EdgeKVError, MediaError
from edgekv.runtime.options import ModelOptions

DEFAULT_PROMPT = "Write a one-paragraph caption for this image."
DEFAULT_VIDEO_PROMPT = "Write a one-paragraph caption for this video."
CTX_STEP = 256  # a clip's context is rounded up to this (llama.cpp pads to it anyway)


@dataclass
class CaptionConfig:
    """Everything a worker needs to build a Captioner (plain values: it travels to Ray actors)."""

    model: str
    mmproj: str | None = None
    model_options: ModelOptions = field(default_factory=ModelOptions)   # -c, -b, -t, -fa, -ctk/-ctv, ...
    method: str = "auto"
    budget: float | int | str = 0.25
    swa_budget: float = 1.0            # Session(swa_budget=): sliding-window models' window block share
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
    video_prompt: str = DEFAULT_VIDEO_PROMPT
    video_fps: float | None = 1.0
    video_max_frames: int | None = 64
    max_kv_cells: int | None = None   # cap the cache for every input (chat's --max-kv-cells)
    cap_option: str = "--max-kv-cells"   # the option that set the cap ("--kv-memory"): a hint names it

    def __post_init__(self) -> None:
        if isinstance(self.model_options, dict):   # to_dict()'s form, as it reaches a Ray actor
            self.model_options = ModelOptions(**self.model_options)

    def to_dict(self) -> dict:
        return asdict(self)


def with_prefix(prefix: str, caption: str) -> str:
    """`--prefix sks` -> "sks, <caption>"; a prefix ending in a space, comma or newline is used as is."""
    if not prefix:
        return caption
    if prefix[-1] in " ,\n\t":
        return prefix + caption
    return f"{prefix}, {caption}"


def compaction_totals(session, default_method: str) -> tuple[int, int, str]:
    """(cells before, cells after, method) of every compaction of one input, not just the first: a tiled
    image, a clip or any input under max_kv_cells is compacted chunk by chunk. Before = what the full
    cache would have held (the cells now + every compaction's saving); the methods in order, once each."""
    reports = session.reports
    after = session.n_cells
    before = after + sum(r.cells_before - r.cells_after for r in reports)
    methods = list(dict.fromkeys(r.method for r in reports))
    return before, after, " + ".join(methods) if methods else default_method


class Captioner:
    """Caption one image or video at a time with one loaded model. `caption()` never raises for a bad input: it
    returns a record with an `error` field instead."""

    def __init__(self, config: CaptionConfig) -> None:
        from edgekv.methods import uses_queries
        from edgekv.runtime import Model

        self.config = c = config
        self.session = None
        self.base_ctx = c.max_kv_cells or c.model_options.n_ctx
        self.model = Model.load(c.model, c.mmproj, c.model_options, n_ctx=self.base_ctx,
                                capture_queries=uses_queries(c.method))
        self.ctx_cells = self.base_ctx   # the n_ctx asked for last (llama.cpp may round it up)
        try:
            if self.model.mtmd is None:
                raise EdgeKVError("captioning needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
            self._open_session()
        except BaseException:
            self.close()
            raise
        self.model_name = Path(c.model).name

    def _split(self, marker: str, prompt: str) -> tuple[str, str, str]:
        """(full prompt, head before the marker, tail from the marker on) of one user turn."""
        c = self.config
        msgs = [{"role": "system", "content": c.system}] if c.system else []
        msgs.append({"role": "user", "content": f"{marker}\n{prompt}"})
        full = self.session.format_chat(msgs, add_assistant=True)
        cut = full.find(marker)
        if cut < 0:
            raise EdgeKVError("the chat template dropped the media marker; cannot caption with this model")
        return full, full[:cut], full[cut:]

    def _open_session(self) -> None:
        """A Session on the current context with the shared head prefilled and snapshotted."""
        from edgekv.runtime import Session
        from edgekv.runtime.lib import mtmd_cpp
        from edgekv.runtime.streaming import VIDEO_MARKER, streaming

        c = self.config
        self.session = Session(self.model, method=c.method, budget=c.budget, compress=c.compress, seed=c.seed,
                               swa_budget=c.swa_budget)
        if c.max_kv_cells is not None:
            streaming(self.session)  # every image / frame chunk compacted right after its prefill
        self.full_prompt, self.head, self.tail = self._split(mtmd_cpp.mtmd_default_marker().decode(), c.prompt)
        self.video_prompt, vhead, vtail = self._split(VIDEO_MARKER, c.video_prompt)
        self.video_head, self.video_tail = vhead, vtail[len(VIDEO_MARKER):]
        self._snap = None
        self.head_tokens = 0
        if c.reuse_prefix and self.head:
            self.session.append_text(self.head)
            self.head_tokens = self.session.n_cells
            self._snap = self.session.snapshot()

    def _use_context(self, n_ctx: int) -> None:
        """Make the context `n_ctx` cells (a no-op when it is already). On failure (e.g. out of memory) the
        previous size is put back and the error raised: this input fails, the batch goes on."""
        if n_ctx == self.ctx_cells:
            return
        old = self.ctx_cells
        self.session.close()
        self.session = None
        try:
            self.model.resize_context(n_ctx)
            self.ctx_cells = n_ctx
        except BaseException:
            self.model.resize_context(old)  # if this fails too, the error says why and later inputs fail
            raise
        finally:
            if self.session is None and self.model.ctx is not None:
                self._open_session()

    def _prefill(self, image: Path) -> None:
        from edgekv.runtime.probe import question_probe

        s = self.session
        s.reports.clear()
        s.probe = question_probe(self.config.prompt)   # known before the image: early / per-chunk compaction
        if self._snap is not None:
            s.restore(self._snap)       # the shared head, as prefilled once
            s.append_prompt(self.tail, [image])
        else:
            s.clear()
            s.append_prompt(self.full_prompt, [image])
        s.compact()

    def caption(self, image: Path) -> dict:
        """The JSONL record for one image or video (without file_name): text and figures, or `error`."""
        c = self.config
        t0 = time.perf_counter()
        base = {"model": self.model_name, "method": c.method, "budget": c.budget}
        try:
            kind = kind_of(image)
            if self.session is None:
                raise EdgeKVError("the model's context could not be recreated after a failed resize; restart the "
                                  "run (it resumes)")
            if kind is None:
                raise MediaError(f"unsupported file type {image.suffix or '(none)'!r}: edgekv caption reads "
                                 f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))}")
            if kind == "video":
                extra = self._prefill_video(image)
            else:
                if c.max_kv_cells is None:
                    self._use_context(self.base_ctx)   # back from a clip's size
                self._prefill(image)
                extra = {}
            cells_before, cells_after, method = compaction_totals(self.session, c.method)
            parts, last = [], None
            for r in self.session.generate(max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p,
                                           top_k=c.top_k, min_p=c.min_p, stop=tuple(c.stop), seed=c.seed):
                parts.append(r.text)
                last = r
            text = with_prefix(c.prefix, "".join(parts).strip())
            warning = extra.pop("warning", None)
            rec = {**base, "method": method, "text": text,
                   "tokens": last.generation_tokens if last else 0,
                   "finish_reason": last.finish_reason if last else None,
                   "kv_cells_before": cells_before, "kv_cells_after": cells_after, **extra,
                   "seconds": round(time.perf_counter() - t0, 4)}
            if warning:
                rec["warning"] = warning
            return rec
        except Exception as e:  # one bad input never ends the batch
            if isinstance(e, ContextOverflowError) and c.max_kv_cells is not None:
                e = e.under(c.cap_option)  # the context is that cap: -c does not apply
            msg = str(e).strip() if isinstance(e, EdgeKVError) else f"{type(e).__name__}: {e}"
            return {**base, "error": msg or type(e).__name__, "seconds": round(time.perf_counter() - t0, 4)}

    def _prefill_video(self, path: Path) -> dict:
        """Stream one clip after the shared head (see the module doc); returns the record's video fields."""
        from edgekv.runtime.sizing import check_fits, context_for
        from edgekv.runtime.probe import question_probe
        from edgekv.runtime.streaming import Video, append_video, state_cells

        c = self.config
        clip = Video(path, fps=c.video_fps, max_frames=c.video_max_frames)  # opens it: a corrupt file fails here
        if c.max_kv_cells is None:
            need = context_for(self.model, [clip], [], c.budget, self.video_prompt, c.max_tokens)
            self._use_context(-(-need // CTX_STEP) * CTX_STEP)
        s = self.session
        s.reports.clear()
        s.video_stats.clear()
        s.probe = question_probe(c.video_prompt)       # known before the clip: every chunk's compaction
        if self._snap is not None and self.video_head == self.head:
            s.restore(self._snap)
        else:
            s.clear()
            s.append_text(self.video_head)
        # the free cells after the head: fail before prefilling (or, under max_kv_cells, lower the budget)
        check_fits(s, [clip], self.video_tail, c.max_tokens, lower_budget=c.max_kv_cells is not None)
        stats = append_video(s, clip)
        s.append_text(self.video_tail)
        s.compact()
        out = {"frames": stats.frames, "video_seconds": round(stats.seconds, 3), "chunks": stats.chunks,
               "kv_peak_cells": max(stats.peak_cells, state_cells(s)), "n_ctx": self.model.n_ctx}
        if stats.error:
            out["warning"] = stats.error
        return out

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
