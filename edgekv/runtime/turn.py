"""Cancel tokens: a Stop belongs to one turn.

A `CancelToken` is made for one turn (the server makes one per request, a UI one per Send) and handed
to `Session.chat(..., cancel=token)`; `token.cancel()` is safe from any thread, at any time:

- before the turn starts: the turn starts cancelled (its prefill raises `Cancelled` at once);
- while it runs: the prefill stops (the turn is rolled back) or the answer ends with finish_reason
  "cancelled" (the answer so far is kept), exactly as `Session.cancel()` does;
- after it ended: nothing; the next turn has its own token and never sees this one.

llama.cpp's abort flag (`Model.set_abort`, read by its abort callback inside `llama_decode`) is set only
while the cancelled token is the one bound to the running turn, and cleared when that turn ends, under
one lock: a cancel and a turn start can no longer interleave into a stale flag that aborts the next turn.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from edgekv.errors import SessionError


class CancelToken:
    """One turn's Stop button. `cancel()` from any thread; `cancelled` to read it."""

    def __init__(self) -> None:
        self._set = False
        self._lock = threading.Lock()
        self._on_cancel: Callable[[], None] | None = None   # the session's abort while a turn runs on it

    def cancel(self) -> None:
        with self._lock:
            self._set = True
            hook = self._on_cancel
        if hook is not None:
            hook()

    @property
    def cancelled(self) -> bool:
        return self._set

    def is_set(self) -> bool:   # the threading.Event spelling the prefill and generation loops read
        return self._set

    def _bind(self, hook: Callable[[], None] | None) -> bool:
        """Attach (or with None, detach) the running turn's abort; True when already cancelled."""
        with self._lock:
            self._on_cancel = hook
            return self._set


class TurnGuard:
    """The token of the turn a session is running now, and llama.cpp's abort flag kept in step with it.

    `scope(token)` runs one turn under `token` (a new one when None); `cancel_current()` is
    `Session.cancel()`. All flag writes happen under one lock, and only for the token that is current, so a
    late cancel of an ended turn never reaches the next one."""

    def __init__(self, set_abort: Callable[[bool], None]) -> None:
        self._set_abort = set_abort
        self._lock = threading.RLock()
        self.current: CancelToken | None = None
        self._thread = 0   # the thread running the current turn

    @contextlib.contextmanager
    def scope(self, token: CancelToken | None = None) -> Iterator[CancelToken]:
        """One turn: binds `token` and clears the abort flag before and after. A nested scope on the same
        thread joins the running turn; another thread starting one gets SessionError."""
        current = self.current
        if current is not None:
            if self._thread != threading.get_ident():
                raise SessionError("another thread is in the middle of a turn on this session: one turn at a "
                                   "time (cancel() is the call that is safe from any thread)")
            if token is not None and token is not current:
                raise SessionError("a turn is already running with another cancel token")
            yield current
            return
        token = self._start(token)
        self._thread = threading.get_ident()
        try:
            yield token
        finally:
            self._thread = 0
            self._end(token)

    def _start(self, token: CancelToken | None) -> CancelToken:
        token = token if token is not None else CancelToken()
        with self._lock:
            self.current = token
            self._set_abort(False)
        if token._bind(lambda: self._abort(token)):   # cancelled before it started
            self._abort(token)
        return token

    def _end(self, token: CancelToken) -> None:
        token._bind(None)
        with self._lock:
            if self.current is token:
                self.current = None
                self._set_abort(False)

    def _abort(self, token: CancelToken) -> None:
        with self._lock:
            if self.current is token:
                self._set_abort(True)

    def cancel_current(self) -> None:
        with self._lock:
            token = self.current
        if token is not None:
            token.cancel()

    def is_set(self) -> bool:
        """Whether the running turn was cancelled (what the prefill and generation loops poll)."""
        token = self.current
        return token is not None and token.cancelled
