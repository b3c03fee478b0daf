"""The lifetime shared by `Model` and `Session`: each holds llama.cpp memory that `close()` frees, once;
`with` and garbage collection close too, and calls after close() raise SessionError."""
from __future__ import annotations

from typing import TypeVar

from edgekv.errors import SessionError

T = TypeVar("T", bound="Closable")


class Closable:
    """A subclass sets `_closed`, defines an idempotent `close()` and says in `closed_message` what
    check_open() raises once it is closed."""

    _closed: bool
    closed_message = "this object was closed"

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise SessionError(self.closed_message)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
