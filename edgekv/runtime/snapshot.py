"""A conversation's whole state, taken and put back: `SessionSnapshot` in memory (trying several methods
on one prefill, a server's cached conversation, a rollback), a file through `saved.py`.

`SessionState` holds the Session methods that read a conversation's state or replace it: the cache, its
ledger (`CacheMarks`), the messages, the text the cache holds and the counters; none runs a turn.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from edgekv.errors import CompactionError, SessionError
from edgekv.runtime import lib
from edgekv.runtime.cache import CacheMarks, CompressedCache

if TYPE_CHECKING:
    from edgekv.runtime.generate import Answers
    from edgekv.runtime.history import CachedText
    from edgekv.runtime.model import Model
    from edgekv.runtime.prefill import Prefiller
    from edgekv.runtime.transaction import Transactions

S = TypeVar("S", bound="SessionState")


@dataclass(frozen=True)
class SessionSnapshot:
    """Everything a Session needs to return to an earlier point (the one snapshot type): the cache's bytes,
    its ledger (`CacheMarks`), the messages and the text the cache holds (`CachedText.state()`)."""

    blob: bytes
    marks: CacheMarks
    messages: tuple = ()
    history: tuple = ("", ())

    def without_logits(self) -> "SessionSnapshot":
        """For keeping between requests: the next turn prefills a new message first, which recomputes the
        logits and the query window (n_vocab floats, 1 MB on Gemma 3, for nothing otherwise)."""
        return dataclasses.replace(self, marks=dataclasses.replace(self.marks, logits=None, window_q=None,
                                                                   window_q_swa=None, window_rows=0))


def _answers_counter(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.answers, name), lambda self, v: setattr(self.answers, name, v),
                    doc=doc)


class SessionState:
    """The Session methods that read its state as data: counters and sizes, snapshot / restore (memory),
    save / load (a file, which keeps the counters too)."""

    # what the Session supplies (with check_open())
    model: Model
    cache: CompressedCache
    prefiller: Prefiller
    answers: Answers
    messages: list[dict]
    history: CachedText
    txns: Transactions

    @property
    def prompt_tokens(self) -> int:
        """Prefilled tokens (media included) of the whole conversation; answers are not counted."""
        return self.prefiller.total_tokens

    @property
    def prompt_seconds(self) -> float:
        return self.prefiller.total_seconds

    @property
    def n_cells(self) -> int:
        return self.cache.n_cells

    @property
    def logits(self) -> np.ndarray:
        return self.cache.current_logits()

    # the whole conversation's answer counters (generate.Answers), writable: clear() and saved.py set them
    generation_tokens = _answers_counter("tokens", "Answer tokens kept in the cache, whole conversation.")
    generation_seconds = _answers_counter("seconds", "Seconds spent answering, whole conversation.")

    def state_blob(self) -> bytes:
        self.check_open()
        return self.cache.state_blob()

    def kv_bytes(self) -> int:
        """K+V bytes the sequence holds in all cache blocks, read off llama.cpp's state (which is checked
        against the session's ledger on the way: a desync is a StateFormatError)."""
        self.check_open()
        return self.cache.counted_nbytes()

    def snapshot(self) -> SessionSnapshot:
        """The cache and bookkeeping as they are now (e.g. to try several methods on one prefill)."""
        return SessionSnapshot(self.state_blob(), self.cache.marks(), tuple(dict(m) for m in self.messages),
                               self.history.state())

    def restore(self, snap: SessionSnapshot) -> None:
        """Put the cache and bookkeeping back as `snapshot()` saw them."""
        self.check_open()
        if not self.cache.set_state(snap.blob):
            raise CompactionError(f"llama.cpp refused the saved state:\n{lib.recent_log()}")
        self.cache.set_marks(snap.marks, fork=True)
        self.messages = [dict(m) for m in snap.messages]
        self.history.set_state(snap.history)

    def save(self, path: str | os.PathLike) -> Path:
        """The conversation (compacted cache, bookkeeping, messages) to one file, with a header naming the
        model, cache types and versions (`edgekv.runtime.saved`). Not during a turn. The recall store is not
        saved: after loading, the packed cells stay as they are and cannot be recalled (docs/recall.md)."""
        from edgekv.runtime import saved

        self.check_open()
        if self.txns.current is not None:
            raise SessionError("cannot save in the middle of a turn")
        return saved.save(self, path)

    @classmethod
    def load(cls: type[S], model: Model, path: str | os.PathLike, **session_kwargs) -> S:
        """A new Session on `model` holding the conversation saved at `path`. The saved settings (method,
        budget, window, ...) apply unless given here. Another model, projector, cache type or
        llama-cpp-python version is a SaveFormatError (nothing reaches llama.cpp)."""
        from edgekv.runtime import saved

        return saved.load_session(cls, model, path, **session_kwargs)

    def load_conversation(self, path: str | os.PathLike) -> None:
        """Replace this session's conversation with the one saved at `path` (this session's settings stay).
        On any error the current conversation is kept as it was."""
        from edgekv.runtime import saved

        self.check_open()
        saved.replace_conversation(self, path)
