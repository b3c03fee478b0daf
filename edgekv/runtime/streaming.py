"""Streaming prefill in bounded memory: video frames (and, on request, every image) go into the cache one
chunk at a time and are compacted right after, so the cells in use never exceed the budget + one chunk
(+ the protected text). docs/architecture.md, "Memory users save": peak memory only drops when the context is *sized* for this,
which `plan_video` computes and `Model.resize_context` applies.

- `Video`: a clip (path or iterator of frames) with its sampling options.
- `ChunkCompactor`: the `Session.after_media_chunk` hook. Between chunks the question is not known yet:
  `auto` and query-aware methods compact on a probe window (the known question, else a generic probe;
  runtime/probe.py), query-agnostic methods without one. `method_for` is the place to change that.
  Each chunk is compacted alone (the `LastChunk` region of runtime/compactor.py: only its cells are read and written,
  so host memory during a compaction is one chunk, not the cache), except on iSWA models (Gemma 3) and
  for methods that must see the whole cache, which take the whole-cache path.
- `append_prompt_with_videos`: a chat turn's text with video markers; each clip is fed as
  timestamp text + frame(s), frame by frame, through `Session.append_prompt`.
- The cell counts reported are re-read from llama.cpp's state (`state_cells`), not computed.
"""
from __future__ import annotations

import ctypes
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Iterator

from edgekv.errors import ContextOverflowError, MediaError
from edgekv.kv.codec import MAGIC
from edgekv.methods import get_method, parse_budget, resolve_budget
from edgekv.runtime.lib import llama_cpp, mtmd_cpp
from edgekv.runtime.video import (DEFAULT_FPS, DEFAULT_MAX_FRAMES, DEFAULT_MAX_SIDE, Frame, VideoReader,
                                  check_sampling, format_timestamp, frames_from_iterable)

VIDEO_MARKER = "<__edgekv_video__>"  # stands for a clip inside a chat message (expanded at prefill)


def state_cells(session) -> int:
    """Cells the sequence holds in the compressible cache block, read from llama.cpp's state blob header
    (magic u32, seq_id i32, n_stream u32, cell_count u32: docs/state-format.md). Only those 16 bytes are
    read: llama.cpp writes the header first and stops at the end of a 16-byte buffer (it returns 0 and
    logs "unexpectedly reached end of buffer"), so counting cells never copies the cache (a whole-blob
    read here was the largest allocation of a full-cache video run). Anything else: the whole blob."""
    ctx = session.model.ctx
    n = llama_cpp.llama_state_seq_get_size(ctx, 0)
    if n < 16:
        return 0
    head = (ctypes.c_uint8 * 16)()
    llama_cpp.llama_state_seq_get_data(ctx, head, 16, 0)
    magic, _, n_stream, cells = struct.unpack_from("<IiII", head)
    if magic == MAGIC and n_stream == 1:
        return cells
    buf = (ctypes.c_uint8 * n)()
    llama_cpp.llama_state_seq_get_data(ctx, buf, n, 0)
    return struct.unpack_from("<I", buf, 12)[0]


# --- the per-chunk hook -------------------------------------------------------------------------------
@dataclass
class ChunkCompactor:
    """After every media chunk: compact what it added (query-agnostic) and record the cell counts that
    llama.cpp's state held before the compaction (the peak is there). budget: per-chunk budget (a ratio
    of the chunk, or None for the session's)."""

    budget: float | int | None = None
    chunks: int = 0
    media_tokens: int = 0                              # all chunks
    chunk_cells: int = 0                               # largest chunk (C)
    peak_cells: int = 0                                # largest count re-read from the state (P)
    trace: list[int] = field(default_factory=list)     # re-read after each chunk, before compacting
    sizes: list[int] = field(default_factory=list)     # tokens of each chunk
    media_budget: int = 0                              # cells the budgets asked to keep, summed

    def method_for(self, session):
        """The method used between chunks: the session's, or `auto` for a query-aware one (with a probe
        window `auto` resolves to its probe pick; with probes off, to its query-agnostic pick)."""
        m = session.method
        return get_method("auto") if m.needs_queries else m

    def __call__(self, session, n_tokens: int) -> None:
        self.chunks += 1
        self.media_tokens += n_tokens
        self.chunk_cells = max(self.chunk_cells, n_tokens)
        r = session.compact(method=self.method_for(session), budget=self.budget, early=True)
        cells = r.cells_before if r is not None else state_cells(session)  # r.cells_before: parsed blob
        if r is not None:
            self.media_budget += r.budget_cells
        self.trace.append(cells)
        self.sizes.append(n_tokens)
        self.peak_cells = max(self.peak_cells, cells)

    def observe(self, session) -> int:
        """Re-read the cells now (end of a turn: text and answer included) into the peak."""
        cells = state_cells(session)
        self.peak_cells = max(self.peak_cells, cells)
        return cells


def streaming(session, budget: float | int | None = None) -> ChunkCompactor:
    """Turn on per-chunk compaction for every media chunk of `session` (images included); returns the
    hook (its counters). Used by `--max-kv-cells`."""
    hook = ChunkCompactor(budget)
    session.after_media_chunk = hook
    return hook


# --- video sources ------------------------------------------------------------------------------------
@dataclass
class Video:
    """A clip for `Session.chat(videos=[...])`: a path, or an iterable of frames (numpy [H, W, 3] uint8 /
    PIL images, or (seconds, image) pairs)."""

    source: object
    fps: float | None = DEFAULT_FPS
    max_frames: int | None = DEFAULT_MAX_FRAMES
    max_side: int | None = DEFAULT_MAX_SIDE
    source_fps: float = 1.0          # timestamps of bare frames from an iterable: i / source_fps
    name: str = ""
    budget: float | None = None      # per-chunk ratio for this clip (None: the session's budget)

    def __post_init__(self) -> None:
        check_sampling(self.fps, self.max_frames)
        self._reader: VideoReader | None = None
        if isinstance(self.source, (str, bytes)) or hasattr(self.source, "__fspath__"):
            self._reader = VideoReader(self.source, fps=self.fps, max_frames=self.max_frames, max_side=self.max_side)
            self.name = self.name or self._reader.path.name
        else:
            self.name = self.name or "frames"

    @property
    def reader(self) -> VideoReader | None:
        return self._reader

    def n_frames(self) -> int | None:
        """Frames the sampling will yield (None: unknown, e.g. an iterator without max_frames)."""
        if self._reader is not None:
            t = self._reader.targets()
            return len(t) if t is not None else self.max_frames
        n = len(self.source) if hasattr(self.source, "__len__") else None
        return min(n, self.max_frames) if n is not None and self.max_frames else (n or self.max_frames)

    def frame_size(self) -> tuple[int, int] | None:
        return self._reader.frame_size if self._reader is not None else None

    def frames(self) -> Iterator[Frame]:
        if self._reader is not None:
            return self._reader.frames()
        return frames_from_iterable(self.source, source_fps=self.source_fps, max_frames=self.max_frames,
                                    max_side=self.max_side)

    @property
    def error(self) -> str | None:
        return self._reader.error if self._reader is not None else None


def as_video(v) -> Video:
    return v if isinstance(v, Video) else Video(v)


@dataclass
class VideoStats:
    """What one clip did to the cache (the report's video lines)."""

    name: str
    frames: int = 0
    seconds: float = 0.0           # timestamp of the last frame read
    media_tokens: int = 0
    chunks: int = 0
    chunk_cells: int = 0           # C
    peak_cells: int = 0            # P, re-read from llama.cpp's state
    media_budget: int = 0          # cells the per-chunk budgets kept, summed
    prefill_seconds: float = 0.0   # decode + encode + compaction, frames only
    compact_seconds: float = 0.0
    error: str | None = None       # the stream broke: frames before it were used

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.prefill_seconds if self.prefill_seconds else 0.0


# --- planning: what a clip costs, so the context can be sized for it -------------------------------------
def frames_merge(model) -> bool:
    """Whether the projector merges two adjacent mergeable frames in time (Qwen2-VL family): tokenize two
    small mergeable frames with touching markers and count the media chunks mtmd makes."""
    return group_cost(model, 56, 56, 2)[2] == 1


def group_cost(model, width: int, height: int, n: int, text: str = "") -> tuple[int, int, int]:
    """(media tokens, text tokens, media chunks) of `text` + n touching frames of this size, by mtmd_tokenize
    on blank frames (preprocessing only, nothing is encoded)."""
    marker = mtmd_cpp.mtmd_default_marker().decode()
    raw = (text + marker * n).encode()
    data = (ctypes.c_uint8 * (width * height * 3))()
    bms = []
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    try:
        for _ in range(n):
            bm = mtmd_cpp.mtmd_bitmap_init(width, height, data)
            mtmd_cpp.mtmd_bitmap_set_mergeable(bm, True)
            bms.append(bm)
        inp = mtmd_cpp.mtmd_input_text(raw, len(raw), False, True)
        arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * n)(*bms)
        rc = mtmd_cpp.mtmd_tokenize(model.mtmd, chunks, ctypes.byref(inp), arr, n)
        if rc != 0:
            raise MediaError(f"the projector cannot preprocess {width}x{height} frames (code {rc})")
        media = text_tok = n_media = 0
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            c = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            k = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(c))
            if mtmd_cpp.mtmd_input_chunk_get_type(c) == 0:
                text_tok += k
            else:
                media += k
                n_media += 1
        return media, text_tok, n_media
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        for bm in bms:
            mtmd_cpp.mtmd_bitmap_free(bm)


@dataclass(frozen=True)
class VideoPlan:
    frames: int
    group: int              # frames per mtmd call (2 when the projector merges pairs)
    groups: int
    chunk_tokens: int       # C: media tokens of one group (the largest chunk the cache takes at once)
    media_tokens: int       # M: all groups
    text_tokens: int        # timestamps + the projector's wrapper tokens, all groups
    budget_cells: int       # media cells kept at the end
    ratio: float            # per-chunk ratio that keeps budget_cells

    @property
    def n_ctx(self) -> int:
        """Cells the clip needs at its fullest: budget + one chunk + text (+1 kept cell per chunk: the
        last cell of each compaction stays, llama.cpp needs pos_max)."""
        return self.budget_cells + self.groups + self.chunk_tokens + self.text_tokens


def plan_video(model, video: Video, budget: float | int, free_cells: int | None = None) -> VideoPlan:
    """What `video` costs at `budget` (ratio of its media tokens, or total cells). With free_cells (a
    --max-kv-cells cap), the budget is lowered so budget + chunk + text fits it."""
    if model.mtmd is None:
        raise MediaError("video needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    n = video.n_frames()
    size = video.frame_size()
    if n is None or size is None:
        raise MediaError(f"{video.name}: sizing the context needs a clip file or an iterator with max_frames")
    group = 2 if frames_merge(model) else 1
    groups = math.ceil(n / group)
    media, text, _ = group_cost(model, size[0], size[1], group, format_timestamp(10 * 60 * 60.0))
    if media > model.n_batch:
        raise MediaError(f"{video.name}: one {'pair of frames' if group == 2 else 'frame'} is {media} tokens but "
                         f"the batch is {model.n_batch}: raise -b/--batch-size to {media} or lower "
                         "--image-max-tokens")
    total = media * groups
    b = parse_budget(budget)
    keep = resolve_budget(b, total)
    if free_cells is not None:
        room = free_cells - media - text * groups - groups
        if room < groups:
            raise ContextOverflowError(
                f"{video.name}: {free_cells} free KV cells cannot hold one chunk ({media} tokens) + the "
                f"timestamps ({text * groups}) + 1 cell per chunk; raise --max-kv-cells or lower --video-max-frames")
        keep = min(keep, room)
    return VideoPlan(n, group, groups, media, total, text * groups, keep, keep / total)


# --- the turn ---------------------------------------------------------------------------------------------
def append_video(session, video, *, budget: float | int | None = None, compact: bool = True) -> VideoStats:
    """Prefill one clip frame by frame (timestamp text, then the frame or merged pair), compacting after
    every chunk so the cache stays at budget + one chunk. budget: per-chunk ratio (default: the session's
    ratio; an absolute session budget is spread over the clip's chunks). compact=False: the full cache
    (the reference the benchmark compares with)."""
    video = as_video(video)
    if session.model.mtmd is None:
        raise MediaError("video needs a multimodal projector: pass --mmproj (or a -hf repo that has one)")
    if not compact:
        return _append_full(session, video)
    if budget is None:
        budget = video.budget
    if budget is None:
        budget = session.budget
        if isinstance(budget, int):  # total cells for the clip -> a ratio of its media tokens
            plan = plan_video(session.model, video, budget)
            budget = plan.ratio
    group = 2 if frames_merge(session.model) else 1
    prev = hook = session.after_media_chunk
    if not isinstance(hook, ChunkCompactor):  # no streaming session: compact this clip's chunks anyway
        hook = ChunkCompactor(budget)
        session.after_media_chunk = hook
    saved_budget, hook.budget = hook.budget, budget
    stats = VideoStats(video.name)
    before = (hook.chunks, hook.media_budget, len(session.reports), len(hook.trace), hook.media_tokens)
    t0 = time.perf_counter()
    try:
        _feed_frames(session, video, group, stats)
    finally:
        hook.budget = saved_budget
        session.after_media_chunk = prev
    stats.prefill_seconds = time.perf_counter() - t0
    new = session.reports[before[2]:]
    stats.compact_seconds = sum(r.seconds for r in new)
    stats.media_tokens = hook.media_tokens - before[4]
    stats.chunks = hook.chunks - before[0]
    stats.chunk_cells = max(hook.sizes[before[3]:], default=0)
    stats.media_budget = hook.media_budget - before[1]
    stats.peak_cells = max(hook.trace[before[3]:], default=0)
    stats.error = video.error
    return stats


def _append_full(session, video: Video) -> VideoStats:
    hook, session.after_media_chunk = session.after_media_chunk, None
    group = 2 if frames_merge(session.model) else 1
    stats = VideoStats(video.name)
    t0 = time.perf_counter()
    try:
        stats.chunks = _feed_frames(session, video, group, stats)
    finally:
        session.after_media_chunk = hook
    stats.prefill_seconds = time.perf_counter() - t0
    stats.media_tokens = int((session.cache.kind == 1).sum())  # PENDING: every media cell, none compacted
    stats.peak_cells = state_cells(session)
    stats.error = video.error
    return stats


def _feed_frames(session, video: Video, group: int, stats: VideoStats) -> int:
    """Decode and prefill the clip `group` frames at a time (one decoded group in memory); returns the
    number of groups fed."""
    marker = mtmd_cpp.mtmd_default_marker().decode()
    pending: list[Frame] = []
    n = 0
    for frame in video.frames():
        pending.append(frame)
        stats.frames, stats.seconds = stats.frames + 1, frame.time
        if len(pending) == group:
            _feed(session, pending, marker)
            pending, n = [], n + 1
    if pending:
        _feed(session, pending, marker)
        n += 1
    return n


def _feed(session, frames: list[Frame], marker: str) -> None:
    text = format_timestamp(frames[0].time) + marker * len(frames)  # touching markers: mtmd may merge them
    session.append_prompt(text, [f.image for f in frames], mergeable=True)


def append_prompt_with_videos(session, text: str, images: list, videos: list) -> list[VideoStats]:
    """A turn's new text in which each VIDEO_MARKER stands for the next clip and each mtmd marker for the
    next image. Text (with its images) goes through `append_prompt`, clips through `append_video`."""
    videos = [as_video(v) for v in videos]
    marker = mtmd_cpp.mtmd_default_marker().decode()
    pieces = text.split(VIDEO_MARKER)
    if len(pieces) - 1 != len(videos):
        raise MediaError(f"{len(videos)} video(s) but the prompt has {len(pieces) - 1} video markers")
    images = list(images)
    stats = []
    for i, piece in enumerate(pieces):
        k = piece.count(marker)
        if piece:
            session.append_prompt(piece, images[:k])
        images = images[k:]
        if i < len(videos):
            stats.append(append_video(session, videos[i]))
    session.video_stats.extend(stats)
    return stats
