"""One model, one Session, one worker thread: requests are served one at a time from a bounded queue.

A turn starts from a kept conversation (restored from the ConversationCache) or from an empty cache,
prefills only the messages the kept one does not have, generates, and keeps the result. Only finished
turns are kept, so a failed or cancelled turn leaves nothing behind: the next request restores a kept
conversation or starts empty, never from a half turn."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgekv.errors import (BudgetError, Cancelled, CompactionError, EdgeKVError, MediaError, ModelLoadError,
                           SaveFormatError, SessionError, StateFormatError)
from edgekv.methods import METHODS, get_method, parse_budget, uses_queries
from edgekv.runtime import CancelToken, Model, Session
from edgekv.runtime.lib import mtmd_cpp
from edgekv.runtime.probe import question_probe
from edgekv.runtime.streaming import VIDEO_MARKER
from edgekv.server.convcache import ConversationCache, MessageKey
from edgekv.server.images import RequestImage, RequestVideo

log = logging.getLogger("edgekv.serve")
MARKER = mtmd_cpp.mtmd_default_marker().decode()


class QueueFull(EdgeKVError):
    """The bounded request queue is full (503, with Retry-After: seconds until a place is likely free)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InternalError(Exception):
    """A turn failed for a reason the client did not cause (500): llama.cpp refused a state, the chat
    template misbehaves. The message goes to the server log, not to the client."""


# EdgeKVErrors the worker can meet that are the server's fault, not the request's (500, not 400)
INTERNAL_ERRORS = (CompactionError, SessionError, StateFormatError, SaveFormatError, ModelLoadError)


@dataclass
class ConvMessage:
    """One message as the session formats it: Session.chat's layout, one marker line per image first."""

    role: str
    text: str
    images: list[RequestImage] = field(default_factory=list)
    videos: list[RequestVideo] = field(default_factory=list)   # the last user message's only (see _serve)

    @property
    def content(self) -> str:
        return "".join(f"{VIDEO_MARKER}\n" for _ in self.videos) + "".join(f"{MARKER}\n" for _ in self.images) + self.text

    @property
    def key(self) -> MessageKey:
        return (self.role, self.content, tuple(m.sha256 for m in (*self.videos, *self.images)))


@dataclass
class Job:
    """A request waiting for (or on) the worker. Events go to the request's asyncio queue:
    ("token", (text, logprobs entries or None)), ("done", result), ("error", exception), ("cancelled", None)."""

    messages: list[ConvMessage]
    gen: dict
    method: str
    budget: float | int
    loop: asyncio.AbstractEventLoop
    tenant: str = ""     # the API key's hash: kept conversations are never shared across keys
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: CancelToken = field(default_factory=CancelToken)   # this request's turn (runtime/turn.py)
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class Engine:
    def __init__(self, model: Model, *, model_id: str, method: str = "auto", budget: float | int = 0.25,
                 compress: str = "media", seed: int = 0, queue_size: int = 8, cache_bytes: int = 1 << 30,
                 max_image_pixels: int = 50_000_000, max_tokens: int = 1024, recall: str = "off",
                 recall_dir: str | None = None, recall_type: str | None = None,
                 recall_disk_bytes: int | None = None, recall_min_share: float | None = None,
                 swa_budget: float = 1.0) -> None:
        self.model, self.model_id = model, model_id
        self.default_method, self.default_budget = method, budget
        self.max_image_pixels, self.max_tokens = max_image_pixels, max_tokens
        # recall: each kept conversation keeps its store (a RAM store counts against cache_bytes; an evicted
        # conversation's store goes with it, its file removed once nothing holds it)
        self.session = Session(model, method=method, budget=budget, compress=compress, seed=seed, recall=recall,
                               recall_dir=recall_dir, recall_type=recall_type, recall_min_share=recall_min_share,
                               swa_budget=swa_budget)
        self.default_probe = self.session.probe   # put back after every turn (see _turn)
        self.cache = ConversationCache(cache_bytes, recall_disk_bytes)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._live: tuple[str, tuple[MessageKey, ...]] | None = None   # (tenant, kept conversation) held now
        self._last_turn_s = 1.0
        # Text longer than this cannot fit n_ctx tokens (no token is longer): refused before tokenizing.
        self.max_prompt_bytes = model.n_ctx * max(1, max(len(model.token_bytes(t, special=True))
                                                         for t in range(model.n_vocab)))
        self.images_encoded = 0        # images handed to the projector, over the server's life
        self.media_chunks_encoded = 0  # image chunks (tiles) the session encoded, counted by its progress
        self.session.progress = self._on_progress
        self.turns = 0
        self.skipped = 0               # queued jobs dropped unrun: their client left while they waited
        self.cancelled_turns = 0       # turns stopped part-way: their client left (or the server stopped)
        self.restore_failures = 0      # kept conversations that would not restore (dropped, prefilled again)
        self._worker = threading.Thread(target=self._loop, name="edgekv-engine", daemon=True)
        self._worker.start()

    # --- called from the web app ----------------------------------------------------------------
    def check_options(self, method: str | None, budget: Any) -> tuple[str, float | int]:
        """The request's method/budget (or the defaults), validated: EdgeKVError subclasses -> 400."""
        method = (method or self.default_method).lower()
        if method not in METHODS:
            raise EdgeKVError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
        if self.model.capture is None and uses_queries(method):
            raise EdgeKVError(f"method {method!r} reads the question's attention, but the server was started "
                              "with a query-agnostic --method and no query capture")
        b = self.default_budget if budget is None else parse_budget(budget)
        if isinstance(b, int) and b > self.model.n_ctx:
            raise BudgetError(f"budget of {b} cells is larger than the context ({self.model.n_ctx} cells)")
        return method, b

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:   # retry when the turn being served is likely done (its recent length)
            raise QueueFull(f"the server is busy: {self._queue.maxsize} requests are already waiting "
                            "(--queue-size); retry later",
                            retry_after=min(60, max(1, math.ceil(self._last_turn_s)))) from None

    def cancel(self, job: Job) -> None:
        """Stop a job (client gone): skipped if still queued, its prefill or generation stopped if running.
        The job's own token: it never reaches another request's turn, and one cancelled before its turn
        started cancels that turn as it starts."""
        job.cancelled.cancel()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def current_cancelled(self) -> bool:
        """Whether the job being served was cancelled (its client went away)."""
        job = self._current
        return job is not None and job.cancelled.is_set()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def close(self, timeout: float | None = None) -> bool:
        """Stop the worker: waiting jobs are dropped, the running one is cancelled. The session (and the
        caller's model) may be freed only once the worker is out of llama.cpp: an image encode cannot be
        aborted. Waits up to `timeout` seconds (None: as long as it takes); False when the worker is still
        running (then nothing is freed; call again)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.cancel(job)
                job.emit("cancelled")
        if self._current is not None:
            self.cancel(self._current)
        self._queue.put(None)   # (a None left by an earlier call was drained above)
        self._worker.join(timeout=timeout)
        if self._worker.is_alive():
            return False
        self.session.close()
        return True

    # --- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():   # its client left while it waited
                self.skipped += 1
                job.emit("cancelled")
                continue
            with self._lock:
                self._current = job
            try:
                self._turn(job)
            except Cancelled:       # cancel() during the prefill: the session rolled the turn back
                self._live = None
                self.cancelled_turns += 1
                job.emit("cancelled")
            except INTERNAL_ERRORS as e:
                self._live = None
                log.error("turn failed: %s", e)
                job.emit("error", InternalError(str(e)))
            except EdgeKVError as e:
                self._live = None
                job.emit("error", e)
            except Exception as e:  # a bug: log it here, answer a clean 500 without the traceback
                self._live = None
                log.error("turn failed:\n%s", traceback.format_exc())
                job.emit("error", e)
            finally:
                with self._lock:
                    self._current = None

    def _start(self, keys: list[MessageKey], tenant: str) -> tuple[int, int]:
        """Restore the longest kept conversation these messages extend, else empty the cache.
        Returns (messages reused, tokens they stand for)."""
        kept = self.cache.match(keys, tenant)
        if kept is None:
            self.session.clear()
            self._live = None
            return 0, 0
        if self._live != (tenant, kept.key):
            self._live = None
            try:
                self.session.restore(kept.snapshot)
            except Exception as e:   # a kept state llama.cpp refuses: forget it and prefill from the start
                log.warning("a kept conversation did not restore (%s); it is dropped and prefilled again", e)
                self.restore_failures += 1
                self.cache.drop(kept.key, tenant)
                self.session.clear()
                return 0, 0
        return len(kept.key), kept.n_tokens

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        if stage == "image":   # called once per image chunk encoded and decoded (even if the turn fails later)
            self.media_chunks_encoded += 1

    def _check_cancelled(self, job: Job) -> None:
        """Between the steps of a turn: stop a job whose client left (the session rolls back)."""
        if job.cancelled.is_set():
            raise Cancelled("the client went away")

    def _configure(self, method: str, budget: float | int) -> None:
        s = self.session
        if s.method_name != method:
            s.method_name, s.method = method, get_method(method)
        s.budget = budget

    def _decode_images(self, msgs: list[ConvMessage], job: Job) -> list:
        """One image at a time (each downscaled before the next is read), stopping if the client left."""
        out = []
        for m in msgs:
            for im in m.images:
                self._check_cancelled(job)
                out.append(im.decode(self.max_image_pixels))
        return out

    def _prefill_history(self, msgs: list[ConvMessage], job: Job) -> bool:
        """Prefill whole messages before the last user message (a conversation the cache did not keep).
        False when the template renders the kept part differently (then the caller starts over)."""
        if any(m.videos for m in msgs):
            raise MediaError("an earlier message of this conversation has a video the server no longer holds "
                             "(its conversation cache was evicted): send the video again in the last message, "
                             "or start a new conversation")
        images = self._decode_images(msgs, job)
        self._check_cancelled(job)
        if not self.session.append_history([{"role": m.role, "content": m.content} for m in msgs], images):
            return False
        self.images_encoded += len(images)
        return True

    def _turn(self, job: Job) -> None:
        """One request. Its question (the last user message) is known before any of its images is read: it
        is the probe window of this turn's early compaction (runtime/probe.py), and of this turn only."""
        s = self.session
        s.probe = question_probe(job.messages[-1].text)
        try:
            # history, images and question: all stopped by this job's token
            with s.turn(job.cancelled), self._clip_folder(job) as folder:
                self._serve(job, folder)
        finally:
            s.probe = self.default_probe

    @staticmethod
    @contextlib.contextmanager
    def _clip_folder(job: Job) -> Iterator[Path | None]:
        """A temporary folder for the request's clips (PyAV reads files), removed after the turn."""
        if not job.messages[-1].videos:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="edgekv-video-") as d:
            yield Path(d)

    def _serve(self, job: Job, folder: Path | None) -> None:
        """One request's turn; `folder` holds its clips' files while they are read (None: no clip)."""
        s, msgs = self.session, job.messages
        t0 = time.perf_counter()
        keys = [m.key for m in msgs]
        reused, cached_tokens = self._start(keys, job.tenant)
        self._live = None                      # from here on the session is mid-turn
        self._check_cancelled(job)
        self._configure(job.method, job.budget)
        s.reports.clear()
        t_restored = time.perf_counter()
        tok0, images0, chunks0 = s.prompt_tokens, self.images_encoded, self.media_chunks_encoded
        history, last = msgs[reused:-1], msgs[-1]
        if history and not self._prefill_history(history, job):
            s.clear()
            reused, cached_tokens, tok0 = 0, 0, s.prompt_tokens
            if not self._prefill_history(msgs[:-1], job):
                raise InternalError("the model's chat template renders this conversation inconsistently")
        last_images = self._decode_images([last], job)
        self._check_cancelled(job)
        clips = [v.open(folder) for v in last.videos]   # streamed frame by frame, compacted per chunk
        turn = s.chat(last.text, last_images, clips, cancel=job.cancelled, **job.gen)
        first = last_rec = None
        text = []
        t_first = None
        try:
            for rec in turn:
                if first is None:   # the prefill (images included) is done
                    first, t_first = rec, time.perf_counter()
                    self.images_encoded += len(last_images)
                last_rec = rec
                if rec.text or rec.logprobs:
                    text.append(rec.text)
                    job.emit("token", (rec.text, rec.logprobs))
                if job.cancelled.is_set():
                    break
        finally:
            turn.close()
        if last_rec is None or last_rec.finish_reason in (None, "cancelled"):   # stopped mid-answer
            self.cancelled_turns += 1
            return job.emit("cancelled")
        answer = s.messages[-1]["content"] if s.messages and s.messages[-1]["role"] == "assistant" else "".join(text)
        new_key = tuple(keys) + (("assistant", answer, ()),)
        prompt_new = s.prompt_tokens - tok0       # prefilled this turn (answers are not counted)
        n_tokens = cached_tokens + prompt_new + last_rec.generation_tokens
        t_done = time.perf_counter()
        # The next turn always prefills a new message first, which recomputes the logits and the query
        # window: keeping them would cost n_vocab floats (1 MB for Gemma 3) per conversation for nothing.
        snap = s.snapshot().without_logits()
        kept = self.cache.put(new_key, snap, n_tokens, replaces=new_key[:reused] if reused else None,
                              tenant=job.tenant)
        self._live = (job.tenant, new_key) if kept else None
        self._last_turn_s = time.perf_counter() - t0
        self.turns += 1
        job.emit("done", self._result(job, last_rec, answer, reused, cached_tokens, prompt_new,
                                      self.images_encoded - images0, self.media_chunks_encoded - chunks0, kept,
                                      dict(queue=t0 - job.submitted, restore=t_restored - t0,
                                           first_token=t_first - t_restored, generate=t_done - t_first,
                                           keep=time.perf_counter() - t_done)))

    def _result(self, job, rec, answer, reused, cached_tokens, prompt_new, images, chunks, kept, timings) -> dict:
        s = self.session
        reports = list(s.reports)
        if reports:   # before: what the cache would hold without this turn's compactions (one per video chunk)
            cells = (reports[-1].cells_after + sum(r.cells_before - r.cells_after for r in reports),
                     reports[-1].cells_after)
            nbytes = (reports[-1].bytes_after + sum(r.bytes_before - r.bytes_after for r in reports),
                      reports[-1].bytes_after)
        else:
            cells = (s.n_cells, s.n_cells)
            nbytes = (s.kv_bytes(),) * 2
        finish = {"context": "length", None: "stop"}.get(rec.finish_reason, rec.finish_reason)
        return {
            "text": answer, "finish_reason": finish,
            "usage": {"prompt_tokens": cached_tokens + prompt_new, "completion_tokens": rec.generation_tokens,
                      "total_tokens": cached_tokens + prompt_new + rec.generation_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached_tokens}},
            "edgekv": {
                "cache": "hit" if reused else "miss", "reused_messages": reused, "cached_tokens": cached_tokens,
                "images_encoded": images, "media_chunks_encoded": chunks,
                "method": reports[-1].method if reports else job.method, "budget": job.budget,
                "cells_before": cells[0], "cells_after": cells[1],
                "bytes_before": nbytes[0], "bytes_after": nbytes[1],
                "kv_cells": s.n_cells, "kept": kept,
                "kept_bytes": self.cache.get_nbytes(self._live[1], self._live[0]) if kept else 0,
                "compaction_s": round(sum(r.seconds for r in reports), 6),
                "recall": self._recall_field(reports),
                "timings": {k + "_s": round(v, 6) for k, v in timings.items()},
            },
        }

    def _recall_field(self, reports) -> dict | None:
        """The store after this turn and what its question's re-selection did; None: recall off."""
        s = self.session
        store = s.cache.store
        if store is None:
            return None
        re = [r for r in reports if r.reselect]
        return {"mode": s.recall, "store_cells": store.n, "store_bytes": store.nbytes,
                "reselected": bool(re), "rewritten": any(r.rewritten for r in re),
                "recalled_cells": sum(r.recalled for r in re),
                "reprefill_tokens": sum(r.reprefill_tokens for r in re),
                "reselect_s": round(sum(r.seconds for r in re), 6),
                "share": max((r.info.get("recall_share", 0.0) for r in re), default=None), "error": s.recall_error}

    def stats(self) -> dict:
        return {"model": self.model_id, "busy": self.busy, "queued": self.queued,
                "queue_size": self._queue.maxsize, "turns": self.turns, "skipped": self.skipped,
                "cancelled_turns": self.cancelled_turns, "restore_failures": self.restore_failures,
                "images_encoded": self.images_encoded,
                "media_chunks_encoded": self.media_chunks_encoded, "kv_cells": self.session.n_cells,
                "conversation_cache": self.cache.stats()}
