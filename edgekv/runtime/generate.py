"""Generation: sampling (temperature, top-k, top-p, min-p), stop strings that never reach the text, and
the stream of typed records, decoding into a CompressedCache.

The stream ends with one record that carries the finish reason; it never repeats a token. When the
stream is closed early (the consumer broke out, or a stop string was found), only the tokens whose text
the consumer has seen stay in the cache, so the text and the cells never disagree.
"""
from __future__ import annotations

import codecs
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edgekv.errors import Cancelled, EdgeKVError
from edgekv.runtime.cache import PROTECTED, CompressedCache

FINISH_REASONS = ("stop", "length", "context", "cancelled")
GEN_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")


@dataclass
class GenerationResponse:
    """One streamed step (mlx-lm style): the new text plus this turn's speed and memory figures.

    prompt_*: the tokens prefilled since the previous answer (this turn's prompt, media included;
    answer tokens are never counted here). generation_*: this answer so far. The last record carries
    finish_reason, one of FINISH_REASONS."""

    text: str
    token: int   # the token this record adds, or -1 when it adds none (a last record after a cancel)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_mb: float
    finish_reason: str | None = None
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


@dataclass
class Answer:
    """What an answer left in the cache once its stream closed (read by the conversation)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""              # the decoded text of `tokens`
    seconds: float = 0.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    try:
        import resource  # POSIX only
    except ImportError:
        try:
            import psutil

            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss) / (1024 * 1024)
        except Exception:
            return 0.0
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def check_gen(gen: dict) -> None:
    """Generation options a user can get wrong, refused before the turn starts."""
    bad = set(gen) - set(GEN_OPTIONS)
    if bad:
        raise EdgeKVError(f"unknown generation option(s) {', '.join(sorted(bad))}; known: {', '.join(GEN_OPTIONS)}")
    if gen.get("max_tokens", 1) < 1:
        raise EdgeKVError(f"max_tokens must be >= 1, got {gen['max_tokens']}")
    if gen.get("temperature", 0.0) < 0:
        raise EdgeKVError(f"temperature must be >= 0, got {gen['temperature']}")
    if not 0.0 < gen.get("top_p", 1.0) <= 1.0:
        raise EdgeKVError(f"top_p must be in (0, 1], got {gen['top_p']}")
    if gen.get("top_k", 0) < 0:
        raise EdgeKVError(f"top_k must be >= 0 (0 = off), got {gen['top_k']}")
    if not 0.0 <= gen.get("min_p", 0.0) < 1.0:
        raise EdgeKVError(f"min_p must be in [0, 1), got {gen['min_p']}")
    stop = gen.get("stop", ())
    if not isinstance(stop, str) and not all(isinstance(s, str) for s in stop):
        raise EdgeKVError("stop must be a string or a list of strings")


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator, top_k: int = 0,
           min_p: float = 0.0) -> int:
    """Greedy at temperature 0; else top-k, temperature, top-p, min-p (llama.cpp's order), then a draw."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    if 0 < top_k < z.shape[0]:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    z = (z - z.max()) / temperature
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = order[: int(np.searchsorted(cum, top_p)) + 1]
        q = np.zeros_like(p)
        q[cut] = p[cut]
        p = q / q.sum()
    if min_p > 0.0:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def find_stop(text: str, stops: tuple[str, ...], shown: int) -> int | None:
    """Where the first stop string starts in `text` (searching only what could be new), or None."""
    best = None
    for s in stops:
        i = text.find(s, max(0, shown - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (held back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream(cache: CompressedCache, answer: Answer, cancel: threading.Event, *, prompt: tuple[int, float],
           max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           min_p: float = 0.0, seed: int = 0, stop: tuple[str, ...] | str = ()) -> Iterator[GenerationResponse]:
    """Sample and decode after the cache's last logits; fills `answer` when the stream closes.
    prompt: (tokens, seconds) of this turn's prefill, for the records."""
    model = cache.model
    stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    rng = np.random.default_rng(seed)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    p_tok, p_s = prompt
    p_tps = p_tok / p_s if p_s else 0.0
    start_past, start_cells, start_logits = cache.n_past, cache.n_cells, cache.current_logits()
    toks: list[int] = []      # answer tokens in the cache
    text = ""                 # their decoded text
    cum = [0]                 # len(text) after each of them
    shown = 0                 # characters of `text` the consumer has been given
    reported = 0              # tokens the consumer has been given (records carry the newest one)
    t0 = time.perf_counter()

    def finish_reason(tok: int) -> str | None:
        """Why the answer ends before decoding `tok` as its next token, or None."""
        if cancel.is_set():
            return "cancelled"
        if model.is_eog(tok):
            return "stop"
        if len(toks) >= max_tokens:
            return "length"
        if cache.n_cells + 1 > model.n_ctx:
            return "context"
        return None

    def record(end: int, token: int, finish: str | None) -> GenerationResponse:
        dt = time.perf_counter() - t0
        n = len(toks)
        return GenerationResponse(text[shown:end], token, p_tok, p_tps, n, n / dt if dt > 0 else 0.0,
                                  peak_rss_mb(), finish, p_s, dt)

    try:
        cut = None
        tok = sample(start_logits, temperature, top_p, rng, top_k, min_p)
        while True:
            finish = finish_reason(tok)
            if finish is not None:
                break
            try:
                cache.decode([tok], "last")
            except Cancelled:
                finish = "cancelled"  # llama.cpp dropped the aborted token's cell
                break
            cache.add_cells(1, PROTECTED)
            toks.append(tok)
            text += dec.decode(model.token_bytes(tok))
            cum.append(len(text))
            cut = find_stop(text, stops, shown)
            if cut is not None:
                finish = "stop"
                break
            tok = sample(cache.logits, temperature, top_p, rng, top_k, min_p)
            if finish_reason(tok) is None:  # more follows: stream this token's text now
                safe = len(text) - stop_prefix_len(text, stops)
                if safe > shown:
                    r = record(safe, toks[-1], None)
                    shown, reported = safe, len(toks)
                    yield r
        if cut is None:  # flush a partial UTF-8 sequence
            text += dec.decode(b"", final=True)
            cum[-1] = len(text)
        end = len(text) if cut is None else cut
        # the token field names a token never reported before: the last decoded one, else the EOG that
        # ended the answer, else -1 (nothing new: a cancel or the length limit right after a record)
        new = toks[-1] if len(toks) > reported else (tok if finish == "stop" and cut is None else -1)
        r = record(end, new, finish)
        shown = end
        yield r
    finally:
        keep = max(i for i, c in enumerate(cum) if c <= shown)
        _keep_tokens(cache, toks, keep, start_past, start_cells, start_logits)
        answer.tokens, answer.text = toks[:keep], text[:cum[keep]]
        answer.seconds = time.perf_counter() - t0


def _keep_tokens(cache: CompressedCache, toks: list[int], keep: int, start_past: int, start_cells: int,
                 start_logits: np.ndarray) -> None:
    """Leave only the first `keep` answer tokens in the cache, with the logits after the last of them."""
    if keep == len(toks) or cache.model.closed:
        return
    cache.drop_tail(start_past + keep, start_cells + keep)
    cache.logits = start_logits
    if keep:  # llama.cpp's logits are past the dropped tokens: decode the last kept one again
        cache.model.set_abort(False)  # a cancel that ended the answer must not abort this decode
        cache.drop_tail(cache.n_past - 1, cache.n_cells - 1)
        cache.decode([toks[keep - 1]], "last")
        cache.add_cells(1, PROTECTED)
