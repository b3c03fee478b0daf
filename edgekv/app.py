"""The surface a desktop app embeds: load a model once, then one `Chat` per conversation.

    import edgekv

    model = edgekv.load_model("model.gguf", "mmproj.gguf")        # or edgekv.load_model(hf="gemma3-4b")
    chat = edgekv.Chat(model, budget=0.25, progress=on_progress)
    for r in chat.stream("What is in this picture?", images=["photo.png"]):
        print(r.text, end="")                                      # r: GenerationResponse
    chat.cancel()                                                  # from a UI thread: stops the turn
    chat.save("conversation.edgekv"); chat = edgekv.Chat.load(model, "conversation.edgekv")

A thin layer over `edgekv.runtime.Session` (which has the full API: compaction reports, snapshots, raw
prefill); what it adds is one name per app action and a `TurnSummary` after each answer."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from edgekv.runtime import CancelToken, GenerationResponse, Model, Session  # noqa: F401 (edgekv.CancelToken)
from edgekv.runtime.options import ModelOptions

APP_DEFAULTS = ModelOptions(n_ctx=8192)   # an app's conversation: room for a few images and turns
from edgekv.runtime.media import ImageInput

Progress = Callable[[str, int, int], None]   # (stage: "prefill" | "image", done, total)


def load_model(model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None, *,
               hf: str | None = None, offline: bool | None = None, options: ModelOptions | None = None,
               **changes) -> Model:
    """Load a GGUF model (+ projector) once; share it between chats one after another.

    hf: 'owner/repo[:QUANT]' or a short name from `edgekv models`, downloaded once into the Hugging Face
    cache. options / keywords: `edgekv.runtime.options.ModelOptions` (n_ctx 8192 unless given, n_batch,
    threads, n_gpu_layers, flash_attn, cache_type_k/v, image_max_tokens, chat_template). Raises `edgekv.EdgeKVError` (a subclass) with a message you can show the user."""
    if hf is not None:
        from edgekv.runtime.hub import resolve

        model, hf_mmproj = resolve(hf, offline=offline)
        mmproj = mmproj or hf_mmproj
    if model is None:
        from edgekv.errors import ModelLoadError

        raise ModelLoadError("no model: pass a GGUF path or hf='owner/repo'")
    return Model.load(model, mmproj, (options or APP_DEFAULTS).with_(**changes))


@dataclass(frozen=True)
class TurnSummary:
    """What the last answer cost: tokens, speed, and what compaction did to the cache."""

    prompt_tokens: int
    completion_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str
    kv_cells: int           # cells the conversation holds now
    kv_bytes: int           # their K+V bytes
    full_bytes: int         # what they would be without compaction (sum over compactions of the saving)
    peak_memory_mb: float


class Chat:
    """One conversation. Use it from one thread at a time; `cancel()` is safe from any thread."""

    def __init__(self, model: Model, *, method: str = "auto", budget: float | int | str = 0.25,
                 progress: Progress | None = None, session: Session | None = None, **session_kwargs) -> None:
        self.session = session or Session(model, method=method, budget=budget, progress=progress,
                                          **session_kwargs)
        self.last: TurnSummary | None = None

    def stream(self, prompt: str, images: Sequence[ImageInput] = (), **gen) -> Iterator[GenerationResponse]:
        """Yield the answer piece by piece (`r.text`); the last record has `finish_reason`
        ("stop", "length", "context" or "cancelled"). gen: max_tokens, temperature, top_p, top_k, min_p,
        seed, stop, and cancel (a `CancelToken` for this turn: its `cancel()` stops this turn only, even
        before it starts). Images: paths, bytes, PIL images or uint8 arrays [H, W, 3]. A failed turn raises and
        leaves the conversation as it was; a cancelled prefill raises `edgekv.errors.Cancelled`."""
        last = None
        for r in self.session.chat(prompt, list(images), **gen):
            last = r
            yield r
        if last is not None:
            self.last = self._summary(last)

    def ask(self, prompt: str, images: Sequence[ImageInput] = (), **gen) -> str:
        """The whole answer at once."""
        return "".join(r.text for r in self.stream(prompt, images, **gen))

    def cancel(self) -> None:
        """Stop the running turn (a Stop button): generation ends with finish_reason "cancelled" and
        keeps the partial answer; a prefill raises Cancelled and the conversation is as before it.
        Between turns it does nothing: to stop a turn that may not have started, pass it a CancelToken."""
        self.session.cancel()

    def save(self, path: str | os.PathLike) -> None:
        """The conversation (compacted cache + messages) in one file; `Chat.load` resumes it."""
        self.session.save(path)

    @classmethod
    def load(cls, model: Model, path: str | os.PathLike, **session_kwargs) -> "Chat":
        return cls(model, session=Session.load(model, path, **session_kwargs))

    @property
    def messages(self) -> list[dict]:
        return self.session.messages

    def clear(self) -> None:
        self.session.clear()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _summary(self, r: GenerationResponse) -> TurnSummary:
        s = self.session
        kv = s.kv_bytes()
        saved = sum(rep.bytes_before - rep.bytes_after for rep in s.reports)
        return TurnSummary(prompt_tokens=r.prompt_tokens, completion_tokens=r.generation_tokens,
                           prompt_tps=r.prompt_tps, generation_tps=r.generation_tps,
                           finish_reason=r.finish_reason or "stop", kv_cells=s.n_cells, kv_bytes=kv,
                           full_bytes=kv + saved, peak_memory_mb=r.peak_memory_mb)
