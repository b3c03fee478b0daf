"""Prefill: prompt text in batches (the last `window` tokens alone, with query capture armed) and media
chunks through mtmd, into a CompressedCache.

Nothing here is transactional: the Session wraps these calls in a turn it can roll back.
"""
from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgekv.errors import Cancelled, MediaError
from edgekv.runtime import lib
from edgekv.runtime.cache import CANCELLED_MESSAGE, PENDING, PROTECTED, CompressedCache
from edgekv.runtime.lib import llama_cpp, mtmd_cpp
from edgekv.runtime.media import ImageInput, load_image
from edgekv.runtime.turn import TurnGuard

Progress = Callable[[str, int, int], None]


@dataclass
class Prefiller:
    """How a session prefills: its cache, window length, progress callback, the early-compaction hook
    (`make_room(n)`: free room for n more cells or raise) and the cancel flag."""

    cache: CompressedCache
    window: int
    make_room: Callable[[int], None]
    cancel: "threading.Event | TurnGuard"   # is_set(): the running turn was cancelled
    progress: Progress | None = None
    on_media_chunk: Callable[[int], None] | None = None  # after every media chunk (streaming compaction)
    tokens: int = 0          # prefilled since the last answer (this turn's prompt; see take_counts)
    seconds: float = 0.0
    total_tokens: int = 0    # the whole conversation's prompt
    total_seconds: float = 0.0

    def take_counts(self) -> tuple[int, float]:
        """This turn's prompt tokens and seconds, and start counting the next turn's."""
        n, s = self.tokens, self.seconds
        self.tokens, self.seconds = 0, 0.0
        return n, s

    def counts(self) -> tuple[int, float, int, float]:
        return self.tokens, self.seconds, self.total_tokens, self.total_seconds

    def set_counts(self, counts: tuple[int, float, int, float]) -> None:
        self.tokens, self.seconds, self.total_tokens, self.total_seconds = counts

    def _count(self, n: int, seconds: float) -> None:
        self.tokens += n
        self.seconds += seconds
        self.total_tokens += n
        self.total_seconds += seconds

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled(CANCELLED_MESSAGE)

    def _progress(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def tokens_in(self, tokens: list[int], compressible: bool = False, logits_all: bool = False,
                  capture: bool = True) -> np.ndarray | None:
        """Decode tokens in n_batch batches; the last `window` of them (at most one batch) alone with the
        query capture armed: the observation window if a compaction follows."""
        c = self.cache
        self.make_room(len(tokens))
        self._check_cancel()
        t0 = time.perf_counter()
        step = c.model.n_batch
        w = min(self.window, step, len(tokens)) if (capture and c.model.capture is not None) else 0
        # Compressible tokens (a document) are never the question: the same batches, but no window, so a
        # later compaction probes for one (runtime/probe.py) instead of protecting the document's tail.
        question = not compressible
        if c.store is not None:   # recall: the question's text, to prefill again if cells come back
            if compressible:
                c.run = None
            else:
                c.start_run()
                c.run.tokens.extend(tokens)
        body, tail = tokens[: len(tokens) - w], tokens[len(tokens) - w:]
        outs = []
        c.window_q, c.window_rows = None, 0
        kind = PENDING if compressible else PROTECTED
        total, done = len(tokens), 0
        for i in range(0, len(body), step):
            chunk = body[i:i + step]
            last = not tail and i + step >= len(body)
            outs.append(c.decode(chunk, "all" if logits_all else ("last" if last else "none")))
            c.add_cells(len(chunk), kind)
            done += len(chunk)
            self._progress("prefill", done, total)
        if tail:
            outs.append(c.decode(tail, "all" if logits_all else "last", capture_rows=w if question else 0))
            c.add_cells(len(tail), kind)
            if w and question:
                c.window_q = c.model.capture.window(c.model.layout.global_layers)
                # the window layers' rows only where a thinning may use them (window_block.py)
                swa = c.model.layout.window_layers if c.swa_budget < 1.0 or c.swa_queries else []
                c.window_q_swa = c.model.capture.window(swa) if swa else None
                c.window_rows = w if c.window_q is not None else 0
                c.swa_due = c.swa_budget < 1.0 and c.window_q_swa is not None and c.window_rows > 0
                c.reselect_due = c.store is not None and c.window_rows > 0
            self._progress("prefill", total, total)
        self._count(len(tokens), time.perf_counter() - t0)
        return np.concatenate([o for o in outs if o is not None]) if logits_all else None

    def media_prompt(self, text: str, images: list[ImageInput], check_all_fits: bool, mergeable: bool = False) -> None:
        """Text with one media marker per image, tokenized by mtmd: text chunks stay protected, image
        chunks become compressible spans. check_all_fits: refuse up front if the whole prompt cannot fit.
        mergeable: the images are video frames that projectors merging frames in time (Qwen2-VL) may pair
        when their markers touch."""
        c = self.cache
        decoded = [load_image(im) for im in images]
        bitmaps = []
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            for im in decoded:
                data = (ctypes.c_uint8 * len(im.data)).from_buffer_copy(im.data)
                bm = mtmd_cpp.mtmd_bitmap_init(im.width, im.height, data)
                if not bm:
                    raise MediaError(f"mtmd could not take image {im.name}")
                bitmaps.append(bm)
                if mergeable:
                    mtmd_cpp.mtmd_bitmap_set_mergeable(bm, True)
            raw = text.encode("utf-8")
            inp = mtmd_cpp.mtmd_input_text(raw, len(raw), c.n_past == 0, True)
            arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mtmd_cpp.mtmd_tokenize(c.model.mtmd, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc == 1:
                raise MediaError(f"{len(images)} image(s) but the prompt has a different number of media markers")
            if rc != 0:
                raise MediaError(f"the projector could not preprocess the image(s) (code {rc}):\n{lib.recent_log()}")
            if check_all_fits:
                c.check_room(int(mtmd_cpp.mtmd_helper_get_n_tokens(chunks)))
            n = mtmd_cpp.mtmd_input_chunks_size(chunks)
            n_media = sum(mtmd_cpp.mtmd_input_chunk_get_type(mtmd_cpp.mtmd_input_chunks_get(chunks, i)) != 0
                          for i in range(n))
            done = 0
            for i in range(n):
                self._check_cancel()
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == 0:   # MTMD_INPUT_CHUNK_TYPE_TEXT
                    n_tok = ctypes.c_size_t()
                    ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tok))
                    self.tokens_in([ptr[j] for j in range(n_tok.value)])
                else:
                    self.media_chunk(chunk)
                    done += 1
                    self._progress("image", done, n_media)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bm)

    def media_chunk(self, chunk) -> None:
        """Encode one image chunk and decode its embeddings (the encode cannot be aborted, the decode
        batches can: mtmd then returns 2 and the batches already decoded stay, for the turn to drop)."""
        c = self.cache
        n_tok = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
        if n_tok > c.model.n_batch and mtmd_cpp.mtmd_decode_use_non_causal(c.model.mtmd, chunk):
            # mtmd would split it into batches, and the image's tokens would not all see each other
            raise MediaError(f"this model's image tokens attend to each other both ways, so one image's "
                             f"{n_tok} tokens must fit one batch: raise -b/--batch-size to {n_tok} or more "
                             f"(it is {c.model.n_batch})")
        self.make_room(n_tok)
        t0 = time.perf_counter()
        new_past = llama_cpp.llama_pos(c.n_past)
        rc = mtmd_cpp.mtmd_helper_eval_chunk_single(c.model.mtmd, c.model.ctx, chunk, c.n_past, 0,
                                                    c.model.n_batch, False, ctypes.byref(new_past))
        if rc == 2 or (rc != 0 and self.cancel.is_set()):
            raise Cancelled(CANCELLED_MESSAGE)
        if rc != 0:
            raise MediaError(f"evaluating an image chunk failed (code {rc}):\n{lib.recent_log()}")
        p0, c.n_past = c.n_past, int(new_past.value)
        c.add_cells(n_tok, PENDING, c.n_media)
        c.note_chunk(p0, c.n_past, n_tok)
        c.n_media += 1
        c.window_q, c.window_rows = None, 0
        c.run = None
        # mtmd's image batches request no logits (its logits_last is for text chunks only): the logits
        # of the text before are stale now, and generating needs text after the image first.
        c.logits = None
        c.logits_after_media = True
        self._count(n_tok, time.perf_counter() - t0)
        if self.on_media_chunk is not None:
            self.on_media_chunk(n_tok)
