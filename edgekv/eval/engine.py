"""What the runner needs from a model: prefill a sample once, then compact copies of that cache.

`Engine` is the small interface the runner drives; `RuntimeEngine` implements it on
`edgekv.runtime` (llama.cpp). Tests drive the runner with a pure-python engine.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edgekv.eval.recall import report_fields as recall_fields
from edgekv.eval.tasks import Sample, Tokenizer


@dataclass
class CompactInfo:
    """What a compaction did (from the runtime's CompactionReport), for the records."""

    cells_before: int
    cells_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    extra: dict = field(default_factory=dict)


class Engine(ABC):
    tokenizer: Tokenizer
    name: str = "engine"

    @abstractmethod
    def prefill(self, sample: Sample, window: int = 32) -> float:
        """Build the full cache of prefix + context (compressible) + question, capturing the queries
        of the question's last `window` tokens. Returns seconds."""

    @abstractmethod
    def compact(self, method: str, budget: float, window: int) -> CompactInfo:
        """Start from the prefilled cache of the current sample and compress its context span."""

    @abstractmethod
    def generate(self, max_tokens: int) -> str:
        """Greedy continuation of the current (compacted) cache."""

    @abstractmethod
    def eval_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher forcing: [len(ids), n_vocab] logits; row i predicts ids[i] (row 0 comes from the
        cache alone, i.e. the logits after the last prompt token)."""

    def ask(self, tokens: Sequence[int]) -> None:
        """A follow-up user turn (task `second`): prefill `tokens` after the answer in the cache."""
        raise NotImplementedError(f"{self.name} has no follow-up turns")

    def followup_info(self) -> dict:
        """What the runtime reported about the follow-up turn (recall: cells brought back, its cost)."""
        return {}

    def describe(self) -> dict:
        return {"engine": self.name}

    def close(self) -> None:
        pass


class ModelTokenizer:
    """`Tokenizer` over a loaded `edgekv.runtime.Model`: real text is tokenized with special=False."""

    def __init__(self, model):
        self.model = model
        self.bos_id = model.bos if model.add_bos else None

    def encode(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_bos=False, special=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.detokenize(list(ids))


REGIMES = ("after", "before", "known")


SWA_SUFFIX = "+swa"   # 'hybridkv+swa0.25': the sliding-window block kept at 0.25 too (Session(swa_budget=))


def split_swa(name: str) -> tuple[str, float]:
    """'hybridkv+swa0.25' -> ('hybridkv', 0.25); a plain name keeps the whole sliding-window block (1.0)."""
    base, sep, value = name.partition(SWA_SUFFIX)
    if not sep:
        return name, 1.0
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    if not 0.0 < f <= 1.0:
        raise ValueError(f"{name!r}: after {SWA_SUFFIX} write the window block's share, in (0, 1]")
    return base, f


def split_regime(label: str) -> tuple[str, str]:
    """'hybridkv@before' -> ('hybridkv', 'before'); a plain name is the question-after regime."""
    name, _, regime = label.partition("@")
    regime = regime or "after"
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r} in {label!r}; choose from {', '.join(REGIMES)}")
    return name, regime


class RuntimeEngine(Engine):
    """The runner's engine on `edgekv.runtime` (llama.cpp).

    prefill(): prefix (protected), context (compressible), question minus its last token (protected;
    its tail is the observation window); the state blob and the session's bookkeeping are snapshotted.
    compact(): restores the snapshot, compacts, then appends the question's last token, so that every
    answer token (the first one too) is computed from the compacted cache.
    recall (issue 20, edgekv/eval/recall.py): off, or the store every compressed run's Session gets (a
    fresh Session per run, so no run inherits another's store); the full-cache reference never has one.
    """

    name = "edgekv.runtime"

    def __init__(self, model_path, *, n_ctx: int, threads: int = 2, n_batch: int = 512,
                 flash_attn: str = "off", cache_type_k: str = "f16", cache_type_v: str = "f16", seed: int = 0,
                 media: bool = False, recall: str = "off", swa_queries: bool = False):
        from edgekv.eval.recall import check_recall
        from edgekv.runtime import Model

        check_recall(recall)

        self.model_path = str(model_path)
        self.media = media
        mmproj, self.codec = None, None
        if media:  # the document arrives as text-in-pixels images (edgekv.eval.pixels)
            from edgekv.eval.pixels import PixelCodec, build_projector

            mmproj = build_projector(model_path)
            self.codec = PixelCodec.for_model(model_path)
        self.model = Model.load(model_path, mmproj, n_ctx=n_ctx, n_batch=n_batch, threads=threads,
                                flash_attn=flash_attn, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
        from edgekv.kv_memory import cache_label

        self.cache_type = cache_label(cache_type_k, cache_type_v)
        self.tokenizer = ModelTokenizer(self.model)
        self.pad = self.model.tokenize("\n", add_bos=False, special=False)[-1] if media else 0
        self.seed = seed
        self.settings = {"n_ctx": self.model.n_ctx, "threads": threads, "n_batch": n_batch,
                         "flash_attn": flash_attn, "cache_type_k": cache_type_k, "cache_type_v": cache_type_v,
                         "media": media}
        self.recall = recall
        self.swa_queries = swa_queries   # some run thins the window block (name+swaF): keep its queries
        self.fresh_sessions = recall != "off"   # one Session per compressed run (a store of its own)
        self.turns: list[tuple[str, int]] = []  # (role, tokens) of the conversation since compact()
        self._n_reports = 0
        self.sess = None
        self._session_for = None
        self._snap = None
        self._snap_before = None
        self._question: list[int] = []
        self._last: list[int] = []
        self.media_prefill_s = 0.0
        self.n_context = 0

    def _session(self, window: int, method: str = "full", budget: float = 1.0):
        """The plain Session (prefill, full cache, recall off), reused; with fresh_sessions a new one for
        each compressed run, made with its method, budget and recall setting. The one live session per
        model is closed first; the caller restores a snapshot into it."""
        from edgekv.eval.recall import session_kwargs
        from edgekv.runtime import Session

        fresh = self.fresh_sessions and method != "full"
        want = (window, method, budget) if fresh else (window, "full", 1.0)
        if self.sess is None or fresh or self._session_for != want:
            if self.sess is not None:
                self.sess.close()
            kw = session_kwargs(self.recall) if fresh else {}
            self.sess = Session(self.model, method=want[1], budget=want[2], window=window, seed=self.seed,
                                auto_compact=False, **kw)
            self.sess.cache.swa_queries = self.swa_queries
            self._session_for = want
        return self.sess

    def prefill(self, sample: Sample, window: int = 32) -> float:
        import time

        s = self._session(window)
        s.clear()
        t0 = time.perf_counter()
        s.append_tokens(list(sample.prefix), compressible=False)
        t1 = time.perf_counter()
        if self.media:
            from edgekv.runtime.lib import mtmd_cpp

            images = self.codec.encode(sample.context, pad=self.pad)
            s.append_prompt(mtmd_cpp.mtmd_default_marker().decode() * len(images), images)
        else:  # compressible: no question window (the document's own tail is no question)
            s.append_tokens(list(sample.context), compressible=True)
        self.media_prefill_s = time.perf_counter() - t1
        self.n_context = int((s.cache.kind == 1).sum())   # the compressible cells (images: padding included)
        self._snap_before = s.snapshot()
        s.append_tokens(list(sample.question[:-1]), compressible=False)
        seconds = time.perf_counter() - t0
        self._question = list(sample.question)
        self._last = list(sample.question[-1:])
        self._snap = s.snapshot()
        return seconds

    def compact(self, method: str, budget: float, window: int) -> CompactInfo:
        """`method` may carry a regime: `name` (question after the document: compact with the question's
        window), `name@before` (compact before the question, which is not known: generic probe for
        query-aware methods), `name@known` (before the question, known in advance: it is the probe)."""
        method, regime = split_regime(method)
        method, swa = split_swa(method)
        if self._snap is None:
            raise RuntimeError("prefill() first")
        s = self._session(self.sess.window, method, budget) if self.fresh_sessions else self.sess
        s.restore(self._snap if regime == "after" else self._snap_before)
        s.cache.swa_budget = swa   # this run's share of the sliding-window block (1: whole)
        n_cells = s.n_cells
        r = None
        if method != "full":
            probe = None if regime == "after" else (list(self._question) if regime == "known" else True)
            r = s.compact(method=method, budget=budget, probe=probe)
        if r is None:
            nbytes = s.kv_bytes()
            info = CompactInfo(n_cells, n_cells, nbytes, nbytes, 0.0)
        else:
            info = CompactInfo(r.cells_before, r.cells_after, r.bytes_before, r.bytes_after, r.seconds,
                               {"plan_s": round(r.plan_seconds, 4), "budget_cells": r.budget_cells,
                                "n_candidates": r.n_candidates, "window_rows": r.window,
                                "merged": r.merged, "resolved": r.method,
                                **{k: v for k, v in r.info.items() if k.startswith(("probe", "swa_"))}})
            info.extra.update(recall_fields([r]))
        bpc = self.model.cell_bytes
        info.extra.update(block_bytes_before=info.cells_before * bpc, block_bytes_after=info.cells_after * bpc,
                          media_prefill_s=round(self.media_prefill_s, 4), regime=regime,
                          n_context=self.n_context)
        tail = self._last if regime == "after" else self._question
        if tail:
            # before: with a recall store the question's queries are captured, so that it can choose again
            capture = regime != "after" and r is not None and self.recall != "off"
            s.append_tokens(tail, compressible=False, capture=capture)
        self.turns = [("user", len(self._question))]
        # the size of what the answer is computed from: K+V of every cache block, as the state blob holds them
        info.extra["kv_bytes"] = s.kv_bytes()
        return info

    def generate(self, max_tokens: int) -> str:
        n = self.sess.generation_tokens
        text = "".join(r.text for r in self.sess.generate(max_tokens=max_tokens, temperature=0.0))
        self.turns.append(("assistant", self.sess.generation_tokens - n))
        return text

    def ask(self, tokens: Sequence[int]) -> None:
        """The follow-up question after the answer the cache holds, with its queries captured (a
        runtime with a recall store re-selects the cells for it before the next token is sampled)."""
        self._n_reports = len(self.sess.reports)
        self.sess.append_tokens(list(tokens), compressible=False, capture=True)
        self.turns.append(("user", len(tokens)))

    def followup_info(self) -> dict:
        return recall_fields(self.sess.reports[self._n_reports:])

    def eval_logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        first = self.sess.logits.copy()[None, :]
        if len(ids) == 1:
            return first
        return np.concatenate([first, self.sess.eval_logits(ids[:-1])], axis=0)

    def describe(self) -> dict:
        lay = self.model.layout
        return {"engine": self.name, "model": self.model_path, "arch": lay.arch, "n_layer": lay.n_layer,
                "n_head_kv": lay.n_head_kv, "head_dim": lay.head_dim, "n_swa": lay.n_swa,
                "global_layers": len(lay.global_layers), "n_params": lay.n_params, **self.settings}

    def close(self) -> None:
        if self.sess is not None:
            self.sess.close()
            self.sess = None
        self.model.close()
