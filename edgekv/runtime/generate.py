"""Generation: sampling (temperature, top-k, top-p, min-p), stop strings that never reach the text, and
the stream of typed records, decoding into a CompressedCache. Optional: the log-probabilities of each
answer token (and the top alternatives), and a GBNF grammar (llama.cpp's grammar sampler) that masks the
logits so the answer follows it (JSON mode).

The stream ends with one record that carries the finish reason; it never repeats a token. When the
stream is closed early (the consumer broke out, or a stop string was found), only the tokens whose text
the consumer has seen stay in the cache, so the text and the cells never disagree.
"""
from __future__ import annotations

import codecs
import ctypes
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from edgekv.errors import Cancelled, EdgeKVError
from edgekv.runtime.cache import PROTECTED, CompressedCache

FINISH_REASONS = ("stop", "length", "context", "cancelled")
GEN_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "logprobs", "grammar")
MAX_TOP_LOGPROBS = 20


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
    # with logprobs: one entry per answer token whose text this record adds (OpenAI's shape: token, logprob,
    # bytes, top_logprobs), log-probabilities of the model's distribution before sampling
    logprobs: list[dict] | None = None


@dataclass
class Answer:
    """What an answer left in the cache once its stream closed (read by the conversation)."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""              # the decoded text of `tokens`
    seconds: float = 0.0


@dataclass
class Answers:
    """A conversation's answers: what the last one left in the cache, and the answer tokens and seconds of
    the whole conversation (Session.generation_tokens / generation_seconds)."""

    last: Answer = field(default_factory=Answer)
    tokens: int = 0
    seconds: float = 0.0

    def stream(self, cache: CompressedCache, cancel: threading.Event, prompt: tuple[int, float],
               gen: dict) -> Iterator[GenerationResponse]:
        """`stream()` one answer; it becomes `last` and is counted once its stream closes."""
        self.last = answer = Answer()
        records = stream(cache, answer, cancel, prompt=prompt, **gen)
        try:
            yield from records
        finally:
            records.close()
            self.tokens += len(answer.tokens)
            self.seconds += answer.seconds


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
    lp = gen.get("logprobs")
    if lp is not None and (not isinstance(lp, int) or not 0 <= lp <= MAX_TOP_LOGPROBS):
        raise EdgeKVError(f"logprobs must be None or a count of alternatives in [0, {MAX_TOP_LOGPROBS}], got {lp!r}")
    if gen.get("grammar") is not None and not isinstance(gen["grammar"], str):
        raise EdgeKVError("grammar must be GBNF text")


class Grammar:
    """llama.cpp's grammar sampler (llama_sampler_init_grammar) used as a mask over edgekv's own logits:
    tokens the grammar cannot take next get -inf; accept() advances it by the token chosen."""

    _DTYPE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])   # llama_token_data

    def __init__(self, model, gbnf: str, root: str = "root") -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._smpl = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), root.encode())
        if not self._smpl:
            raise EdgeKVError("the grammar does not parse (llama.cpp's GBNF parser refused it)")
        n = model.n_vocab
        self._buf = np.zeros(n, self._DTYPE)
        self._buf["id"] = np.arange(n, dtype=np.int32)
        self._arr = llama_cpp.llama_token_data_array(
            self._buf.ctypes.data_as(llama_cpp.llama_token_data_p), n, -1, False)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        b = self._buf
        b["id"] = np.arange(b.shape[0], dtype=np.int32)
        b["logit"], b["p"] = logits, 0.0
        self._arr.size, self._arr.selected, self._arr.sorted = b.shape[0], -1, False
        self._lib.llama_sampler_apply(self._smpl, ctypes.byref(self._arr))
        out = np.full(logits.shape[0], -np.inf, np.float32)
        n = self._arr.size
        out[b["id"][:n]] = b["logit"][:n]
        return out

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self._smpl, token)

    def close(self) -> None:
        if self._smpl:
            self._lib.llama_sampler_free(self._smpl)
            self._smpl = None


def token_logprobs(model, logits: np.ndarray, token: int, top: int) -> dict:
    """OpenAI's logprobs entry for `token` under `logits`: log-softmax in float64, top alternatives first."""
    z = logits.astype(np.float64)
    lse = z.max() + np.log(np.exp(z - z.max()).sum())

    def entry(t: int) -> dict:
        b = model.token_bytes(int(t))
        return {"token": b.decode("utf-8", "replace"), "logprob": float(z[t] - lse), "bytes": list(b)}

    out = entry(token)
    alts = []
    if top:
        idx = np.argpartition(-z, top - 1)[:top] if top < z.shape[0] else np.arange(z.shape[0])
        alts = [entry(t) for t in idx[np.argsort(-z[idx], kind="stable")]]
    out["top_logprobs"] = alts
    return out


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
           min_p: float = 0.0, seed: int = 0, stop: tuple[str, ...] | str = (), logprobs: int | None = None,
           grammar: str | None = None) -> Iterator[GenerationResponse]:
    """Sample and decode after the cache's last logits; fills `answer` when the stream closes.
    prompt: (tokens, seconds) of this turn's prefill, for the records. logprobs: None, or the number of
    top alternatives each token's logprobs entry lists. grammar: GBNF the answer must follow."""
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
    lps: list[dict] = []      # with logprobs: the entry of each token in `toks`
    lp_sent = 0               # entries the consumer has been given
    gram = Grammar(model, grammar) if grammar is not None else None
    t0 = time.perf_counter()

    def pick(logits: np.ndarray) -> int:
        masked = gram.mask(logits) if gram is not None else logits
        tok = sample(masked, temperature, top_p, rng, top_k, min_p)
        if logprobs is not None:
            lps.append(token_logprobs(model, logits, tok, logprobs))
        if gram is not None:
            gram.accept(tok)
        return tok

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
        nonlocal lp_sent
        dt = time.perf_counter() - t0
        n = len(toks)
        entries = None
        if logprobs is not None:   # the tokens whose text ends within what this record shows
            k = max(i for i, c in enumerate(cum) if c <= end)
            entries, lp_sent = lps[lp_sent:max(k, lp_sent)], max(k, lp_sent)
        return GenerationResponse(text[shown:end], token, p_tok, p_tps, n, n / dt if dt > 0 else 0.0,
                                  peak_rss_mb(), finish, p_s, dt, entries)

    try:
        cut = None
        tok = pick(start_logits)
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
            tok = pick(cache.logits)
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
        if gram is not None:
            gram.close()
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
