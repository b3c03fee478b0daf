"""The conversation: messages through the chat template, turns as transactions, cancel.

A Session owns one CompressedCache (`cache.py`: the cells' ledger, decode, compaction through
`compactor.py`), prefills through a Prefiller (`prefill.py`) and answers through `generate.Answers`
(`generate.py`). What it adds is the conversation: the messages, the text the cache holds
(`history.py`, which also cuts the cache back when a template re-renders history), when and how to
compact (`policy.py`), and turns that either complete or leave no trace (`transaction.py`), each with its
own cancel token (`turn.py`). Snapshots, save and load are in `snapshot.py`; close() and `with` in
`lifetime.py`.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Literal

import numpy as np

from edgekv.errors import BudgetError, Cancelled, EdgeKVError, MediaError, SessionError
from edgekv.methods import Method, get_method, parse_budget
from edgekv.kv.store import RecallStore, check_recall
from edgekv.runtime import policy, recall, template
from edgekv.runtime.cache import CANCELLED_MESSAGE, PACKED, PENDING, PROTECTED, CompactionReport, CompressedCache
from edgekv.runtime.generate import FINISH_REASONS, Answers, GenerationResponse, check_gen, peak_rss_mb, sample
from edgekv.runtime.history import CachedText
from edgekv.runtime.lib import mtmd_cpp
from edgekv.runtime.lifetime import Closable
from edgekv.runtime.media import ImageInput
from edgekv.runtime.model import Model
from edgekv.runtime.prefill import Prefiller, Progress
from edgekv.runtime.recall import DEFAULT_MIN_SHARE
from edgekv.runtime.snapshot import SessionSnapshot, SessionState
from edgekv.runtime.transaction import Transactions
from edgekv.runtime.turn import CancelToken, TurnGuard

__all__ = ["Session", "SessionSnapshot", "CancelToken", "CompactionReport", "GenerationResponse", "FINISH_REASONS",
           "PROTECTED", "PENDING", "PACKED", "peak_rss_mb"]


class Session(Closable, SessionState):
    """One conversation on a loaded `Model` (one live session per model).

    method:   a registered method name (`auto` picks by regime) or a Method instance.
    budget:   ratio (0, 1] of the compressible cells, or an absolute cell count.
    compress: "media" compresses image/frame spans (and spans appended with compressible=True);
              "all" compresses every prompt token except the first and the observation window.
    window:   observation-window length W (the last W prompt tokens, whose queries are captured; at most
              one batch, -b).
    early_compact: when the next media chunk would not fit the context, compact the media already
              prefilled first (query-agnostic: the question has not arrived). This is what lets a context
              sized for the budget hold a many-tile image or many frames (docs/architecture.md, "Memory users save").
    progress: called as progress(stage, done, total) during prefill ("prefill": tokens) and for image
              chunks ("image": chunks), on the thread that runs the turn.
    probe:    the probe window used when compaction must happen with no question window (early compaction,
              or compact() before the user's question; runtime/probe.py): the question text when it is known
              in advance, True for a generic probe, False for none (query-agnostic `auto` pick then).
    recall:   "off", "ram" or "disk": keep the original rows of compacted cells in a store outside the
              context, and let every question choose among all of them (runtime/recall.py, docs/recall.md).
              recall_dir: the disk store's folder (default a temporary one); recall_type: store rows as
              f16, q8_0 or q4_0 (default: the cache's own type, bit-exact); recall_reprefill: when cells
              come back, prefill the question's text again ("question") or its last token alone ("last");
              recall_passes: choose this many times per question (each with the window re-captured);
              recall_min_share: bring cells back only when, in some KV head, they would hold at least this
              share of the window's attention on the chosen cells (0: whenever the chosen set differs;
              None: runtime/recall.py's DEFAULT_MIN_SHARE).
    swa_budget: iSWA models (Gemma 3): the share of the sliding-window block a compaction with the
              question's window keeps, the same cells in every window layer (runtime/window_block.py,
              docs/memory.md); 1 (default): the window block stays whole, as llama.cpp keeps it.
    """

    probe: str | bool = True
    closed_message = "this session was closed"

    def __init__(self, model: Model, *, method: str | Method = "auto", budget: float | int | str = 0.25,
                 compress: Literal["media", "all"] = "media", window: int = 32, seed: int = 0,
                 auto_compact: bool = True, early_compact: bool = True,
                 method_kwargs: dict | None = None, progress: Progress | None = None,
                 probe: str | bool = True, recall: str = "off", recall_dir: str | os.PathLike | None = None,
                 recall_type: str | None = None, recall_reprefill: str = "question", recall_passes: int = 1,
                 recall_min_share: float | None = None, swa_budget: float = 1.0) -> None:
        self._closed = True  # until attached: close() and __del__ must not detach another session
        if compress not in ("media", "all"):
            raise EdgeKVError(f"compress must be 'media' or 'all', got {compress!r}")
        if int(window) < 1:
            raise EdgeKVError(f"window must be >= 1, got {window}")
        if not 0.0 < float(swa_budget) <= 1.0:
            raise EdgeKVError(f"swa_budget must be in (0, 1], got {swa_budget}")
        model.check_open()
        self.model = model
        self.method_name = method if isinstance(method, str) else method.name
        self.method_kwargs = dict(method_kwargs or {})
        self.method = get_method(method, **self.method_kwargs) if isinstance(method, str) else method
        self.budget = parse_budget(budget)
        if isinstance(self.budget, int) and self.budget > model.n_ctx:
            raise BudgetError(f"budget of {self.budget} cells is larger than the context ({model.n_ctx} cells)")
        self.compress = compress
        self.window = int(window)
        self.seed = seed
        self.auto_compact = auto_compact
        self.early_compact = early_compact
        self.probe = policy.check_probe(probe)
        check_recall(recall, recall_type)
        self.recall = recall
        self.recall_passes = int(recall_passes)   # re-selection passes per question (runtime/recall.py)
        self.recall_error: str | None = None   # why the store was dropped, if it was
        model.attach(self)
        self._closed = False
        self._turns = TurnGuard(model.set_abort)   # the running turn's cancel token (runtime/turn.py)
        self.txns = Transactions(self)   # the running turn's rollback point (runtime/transaction.py)
        self.answers = Answers()   # the last answer and the conversation's answer counters
        try:
            self.cache = CompressedCache(model, None if recall == "off" else
                                         RecallStore(recall, recall_dir, recall_type))
        except BaseException:
            self.close()
            raise
        if recall_reprefill not in ("question", "last"):
            self.close()
            raise EdgeKVError(f"recall_reprefill must be 'question' or 'last', got {recall_reprefill!r}")
        self.cache.reprefill = recall_reprefill
        if recall_min_share is None:
            recall_min_share = DEFAULT_MIN_SHARE   # (`recall` here is the argument, not the module)
        if not 0.0 <= recall_min_share < 1.0:
            self.close()
            raise EdgeKVError(f"recall_min_share must be in [0, 1), got {recall_min_share}")
        self.cache.recall_min_share = float(recall_min_share)
        self.cache.swa_budget = float(swa_budget)
        self.prefiller = Prefiller(self.cache, self.window, self._make_room, self._turns, progress,
                                  on_media_chunk=self._after_media_chunk)
        # Streaming prefill (edgekv.runtime.streaming): called as hook(session, n_tokens) after every media
        # chunk, e.g. to compact each frame/image as soon as it is in the cache. None: compact at the end.
        self.after_media_chunk = None
        self.video_stats: list = []  # streaming.VideoStats of every clip this session prefilled
        self.reports: list[CompactionReport] = []
        self.clear()

    @property
    def progress(self) -> Progress | None:
        return self.prefiller.progress

    @progress.setter
    def progress(self, fn: Progress | None) -> None:
        self.prefiller.progress = fn

    def check_open(self) -> None:
        """SessionError when this session, or its model, was closed."""
        super().check_open()
        self.model.check_open()

    def clear(self) -> None:
        """Forget the conversation and empty the cache (counters and reports too)."""
        self.check_open()
        self.cache.reset()
        self.messages: list[dict] = []
        self.history = CachedText()   # the text the cache holds (runtime/history.py)
        self.reports.clear()
        self.prefiller.set_counts((0, 0.0, 0, 0.0))
        self.generation_tokens, self.generation_seconds = 0, 0.0

    # --- transactions and cancel ----------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the turn running now, from any thread: its prefill raises `Cancelled` (the conversation is
        as before the turn), its answer ends with finish_reason "cancelled" (the answer so far is kept).
        No turn running: nothing. A turn not started yet: its own `CancelToken` (docs/architecture.md,
        "Turns as transactions, and cancellation")."""
        self._turns.cancel_current()

    @contextlib.contextmanager
    def turn(self, token: CancelToken | None = None) -> Iterator[CancelToken]:
        """The scope of one turn: `token` (a new one when None) is what `token.cancel()` and `cancel()`
        stop, and llama.cpp's abort flag is clear before and after. chat(), generate(), the append_*
        calls and compact() each run in one of their own; nested calls on the same thread join the
        outer one, so `with session.turn(token):` puts several calls (a server request's history, then
        its question) under one token."""
        self.check_open()
        with self._turns.scope(token) as token:
            yield token

    def _check_cancel(self) -> None:
        if self._turns.is_set():
            raise Cancelled(CANCELLED_MESSAGE)

    # --- prefill --------------------------------------------------------------------------------
    def _make_room(self, n: int) -> None:
        """Compact pending media early if `n` more cells would not fit, then check again."""
        c = self.cache
        if c.n_cells + n > self.model.n_ctx and self.early_compact and (c.kind == PENDING).any():
            self.compact(early=True)
        c.check_room(n)

    def append_tokens(self, tokens: list[int], *, compressible: bool = False, logits_all: bool = False,
                      capture: bool = True) -> np.ndarray | None:
        """Prefill tokens. The last `window` of them (at most one batch) are decoded alone with query
        capture armed (they are the observation window if compaction follows). Returns logits for every
        token if logits_all. A transaction: on failure or cancel the cache is as before the call."""
        tokens = list(tokens)
        if not tokens:
            return None
        with self.txns.scope(expect=len(tokens)):
            return self.prefiller.tokens_in(tokens, compressible, logits_all, capture)

    def append_text(self, text: str, *, compressible: bool = False, special: bool = True) -> None:
        add_bos = self.cache.n_past == 0 and self.model.add_bos
        self.append_tokens(self.model.tokenize(text, add_bos=add_bos, special=special), compressible=compressible)

    def eval_logits(self, tokens: list[int]) -> np.ndarray:
        """Teacher forcing: append tokens (protected) and return [n, n_vocab] logits, row i predicting
        token i+1. The first row predicts after tokens[0]; use `logits` before calling for tokens[0]."""
        return self.append_tokens(tokens, logits_all=True, capture=False)

    def append_prompt(self, text: str, images: list[ImageInput] = (), mergeable: bool = False) -> None:
        """Text with one media marker per image (mtmd_default_marker()), tokenized and prefilled by mtmd.
        Image chunks become compressible spans; text chunks stay protected. A transaction. mergeable:
        the images are video frames (see Prefiller.media_prompt)."""
        images = list(images)
        if not images:
            return self.append_text(text)
        if self.model.mtmd is None:
            raise MediaError("this model was loaded without an mmproj (--mmproj): it cannot read images")
        with self.txns.scope():
            self.prefiller.media_prompt(text, images, check_all_fits=not self.early_compact, mergeable=mergeable)

    def _after_media_chunk(self, n_tokens: int) -> None:
        self.history.forget_marks()
        if self.after_media_chunk is not None:
            self.after_media_chunk(self, n_tokens)

    # --- compaction -----------------------------------------------------------------------------
    def candidates(self) -> np.ndarray:
        """[cells] bool: what the next compaction may evict."""
        return self.cache.candidates(self.compress)

    def compact(self, method: str | Method | None = None, budget: float | int | str | None = None,
                early: bool = False, probe: str | bool | None = None) -> CompactionReport | None:
        """Compress the compressible cells appended since the last compaction. On any failure the
        original cache is restored and CompactionError raised. Returns None when there is nothing to do.

        early: the question has not arrived (media still coming in), so the compaction is query-agnostic:
        whatever text was captured last (e.g. the newline between two images) is no question.
        With no question window (or early), `auto` and query-aware methods use a probe window
        (runtime/probe.py; `probe`: the question if known, True generic, False none; default self.probe).
        A blank probe text is an error. Runs as a turn of its own when called outside one (`cancel()`
        stops its probe decode)."""
        with self.turn():
            return policy.compact(self, method, budget, early, policy.check_probe(self.probe if probe is None else probe))

    # --- chat & generation ----------------------------------------------------------------------
    def format_chat(self, messages: list[dict], add_assistant: bool = True) -> str:
        """The conversation through the chat template (runtime/template.py); ChatML, said once on stderr,
        when the model has no template llama.cpp can use."""
        out = template.apply(self.model.chat_template(), messages, add_assistant)
        if out is not None:
            return out
        reason = self.model.template_warning()
        if reason is not None:
            template.warn_fallback(reason)
        return template.chatml(messages, add_assistant)

    def chat(self, prompt: str, images: list[ImageInput] = (), videos: list = (), *,
             cancel: CancelToken | None = None, **gen) -> Iterator[GenerationResponse]:
        """One user turn: images + prompt through the chat template, compaction, streamed answer.
        Later turns reuse the (compacted) cache: only the new part of the conversation is prefilled.
        videos: paths, frame iterators or streaming.Video, streamed frame by frame and compacted after
        each chunk (edgekv.runtime.streaming); a clip that breaks half-way keeps the frames before it.

        A transaction: an exception (or a cancelled prefill: `Cancelled`) leaves the cache and messages
        as before the turn; breaking out of the loop or `cancel()` during the answer keeps what was
        answered so far as the assistant's message (as chat UIs do). cancel: this turn's token
        (runtime/turn.py); `token.cancel()` stops this turn only, even before it starts."""
        images, videos = list(images), list(videos)
        check_gen(gen)
        marker = mtmd_cpp.mtmd_default_marker().decode()
        content = "".join(f"{marker}\n" for _ in images) + prompt
        if videos:
            from edgekv.runtime.streaming import VIDEO_MARKER

            content = "".join(f"{VIDEO_MARKER}\n" for _ in videos) + content
        with self.turn(cancel):
            with self.txns.scope() as txn:
                self.messages.append({"role": "user", "content": content})
                full = self.format_chat(self.messages, add_assistant=True)
                start = self.history.sync(full, self.cache, self.txns.stash)
                if videos:
                    from edgekv.runtime.streaming import append_prompt_with_videos

                    append_prompt_with_videos(self, full[start:], images, videos)
                else:
                    self.append_prompt(full[start:], images)
                self.history.text = full
                if self.auto_compact:
                    self.compact()
                self._check_cancel()  # a cancel during the compaction still stops the prefill
                self.history.mark(self.cache)     # the answer starts here: the next render may trim it
            # The answer: kept (whole or partial) unless generation itself fails, which undoes the turn.
            answer = []
            self.txns.answering = txn
            try:
                with contextlib.closing(self._stream(gen)) as records:
                    for r in records:
                        answer.append(r.text)
                        yield r
            except GeneratorExit:
                self._commit_answer("".join(answer))
                raise
            except BaseException:
                self.txns.rollback(txn)
                raise
            finally:
                self.txns.answering = None
            self._commit_answer("".join(answer))

    def append_history(self, messages: list[dict], images: list[ImageInput] = ()) -> bool:
        """Prefill whole earlier messages of a conversation (e.g. a server request whose history the cache
        does not hold) without answering. `images` are the messages' images in order. False, and nothing
        changed, when the chat template renders the text already in the cache differently (start over
        with clear()). A transaction."""
        self.check_open()
        msgs = self.messages + [dict(m) for m in messages]
        full = self.format_chat(msgs, add_assistant=False)
        with self.txns.scope():
            try:
                start = self.history.sync(full, self.cache, self.txns.stash)
            except SessionError:
                return False
            self.append_prompt(full[start:], list(images))
            self.messages, self.history.text = msgs, full
        return True

    def _commit_answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.history.text += self.answers.last.text   # what the cache holds (a prefix of `text`)

    def generate(self, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, seed: int | None = None, stop: tuple[str, ...] | str = (),
                 cancel: CancelToken | None = None) -> Iterator[GenerationResponse]:
        """Stream tokens after the current prompt. The last response carries finish_reason ('stop',
        'length', 'context' or 'cancelled'). A stop string ends the answer and never appears in the text
        (nor in the cache: the tokens that spelled it are removed). cancel: as in chat()."""
        gen = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                   seed=seed, stop=stop)
        check_gen(gen)
        self.check_open()
        return self._stream(gen, cancel)

    def _stream(self, gen: dict, cancel: CancelToken | None = None) -> Iterator[GenerationResponse]:
        with self.turn(cancel):
            gen = {**gen, "seed": self.seed if gen.get("seed") is None else gen["seed"]}
            if recall.due(self.cache):   # a question appended by hand: it chooses before the first token
                self.compact()
            if self.cache.swa_due:       # swa_budget: no compaction chose with this question's window
                policy.thin_window(self)
            self.cache.run = None        # the answer ends the question's text run
            yield from self.answers.stream(self.cache, self._turns, self.prefiller.take_counts(), gen)

    sample = staticmethod(sample)   # generate.sample: greedy at temperature 0, else top-k/top-p/min-p

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the batch and let another Session use the model. Idempotent."""
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.free()
            if cache.store is not None:
                cache.store.close()
        if not getattr(self, "_closed", True):
            self._closed = True
            self.model.detach(self)
