"""Turns as transactions: a turn either completes or leaves no trace (docs/architecture.md, "Turns as
transactions, and cancellation").

While nothing was compacted inside a turn, its cells are the tail of the sequence and
`llama_memory_seq_rm` from the turn's first position drops them. The first compaction (or history cut)
inside a turn keeps the blob it read anyway (`stash`, no extra copy), and a rollback puts it back first.
On iSWA models (Gemma 3) the sliding-window block is checkpointed as the turn starts and put back too:
llama.cpp overwrites window cells masked for the newest position, which the turn's start still needs.
"""
from __future__ import annotations

import contextlib
import ctypes
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgekv.errors import CompactionError
from edgekv.runtime import lib
from edgekv.runtime.cache import CacheMarks


@dataclass
class Txn:
    """Where the current turn started: the cache's ledger, the conversation and the counters."""

    marks: CacheMarks
    messages: list
    n_reports: int
    counts: tuple[int, float, int, float]
    history: tuple = ("", ())   # CachedText.state()
    stash: bytes | ctypes.Array | None = None  # the blob a compaction read (its ctypes buffer, no copy)
    swa: bytes | None = None   # iSWA models: the sliding-window block at the start (see swa_checkpoint)


class Transactions:
    """The rollback points of one Session: the turn being prefilled (`current`) and the one whose answer
    is being generated (`answering`)."""

    def __init__(self, session) -> None:
        self.session = session
        self.current: Txn | None = None
        self.answering: Txn | None = None

    @property
    def running(self) -> Txn | None:
        return self.current or self.answering

    @contextlib.contextmanager
    def scope(self, expect: int | None = None) -> Iterator[Txn]:
        """Roll the cache and bookkeeping back to here if the body raises (nested calls join the outer).
        expect: how many cells the body adds, when known."""
        s = self.session
        with s.turn():   # raises if another thread runs a turn
            if self.current is not None:
                yield self.current
                return
            self.current = txn = Txn(s.cache.marks(), [dict(m) for m in s.messages], len(s.reports),
                                     s.prefiller.counts(), s.history.state(), swa=self.swa_checkpoint(expect))
            try:
                yield txn
            except BaseException:
                self.rollback(txn)
                raise
            finally:
                self.current = None

    def swa_checkpoint(self, expect: int | None) -> bytes | None:
        """On an iSWA model (Gemma 3), the sliding-window block as the turn starts. Decoding overwrites
        cells that are masked for the newest position (llama.cpp's find_slot takes them), and blobs leave
        them out, so after dropping the turn's tail the first positions could no longer see the window
        they need. A single token cannot lose a cell the next token at its position would see, so
        teacher forcing one token at a time needs no checkpoint. expect: cells the turn adds, if known."""
        c = self.session.cache
        if not c.model.layout.iswa or not c.n_cells or (expect is not None and expect <= 1):
            return None
        return c.swa_state()

    def rollback(self, t: Txn) -> None:
        s = self.session
        if s.closed or s.model.closed:
            return
        c = s.cache
        if t.stash is not None and not c.set_state(t.stash):
            s.clear()
            raise CompactionError("could not roll the failed turn back; the conversation was cleared:\n"
                                  + lib.recent_log())
        c.drop_tail(t.marks.n_past, t.marks.kind.shape[0])
        if t.swa is not None and not c.set_swa_state(t.swa):
            s.clear()
            raise CompactionError("could not roll the sliding-window cache back; the conversation was "
                                  f"cleared:\n{lib.recent_log()}")
        c.set_marks(t.marks)
        s.messages = t.messages
        s.history.set_state(t.history)
        del s.reports[t.n_reports:]
        s.prefiller.set_counts(t.counts)

    def stash(self, blob: bytes | ctypes.Array) -> None:
        """Keep `blob` (the whole cache just read) as the running turn's rollback point, unless it has one:
        a compaction is about to rewrite the cache. Outside a turn, nothing."""
        t = self.running
        if t is not None and t.stash is None:
            t.stash = blob

    def lone_chunk(self, cand: np.ndarray) -> tuple[int, int, int, int] | None:
        """The last media chunk, when the candidates are that chunk alone (CompressedCache.chunk_range) and
        rolling the running turn back (dropping its tail) undoes a rewrite of it: it was added in this
        turn. Then compacting it alone needs no rollback blob. None: the whole-cache path."""
        chunk = self.session.cache.chunk_range(cand)
        t = self.running
        return chunk if chunk is not None and (t is None or t.marks.n_past <= chunk[0]) else None
