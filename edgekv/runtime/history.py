"""The conversation text the cache holds, and where its prefills started.

A chat turn renders the whole conversation through the chat template and prefills only what the cache
does not hold yet. Templates that normalise history (llama.cpp's gemma and llama3 trim every message;
others drop earlier reasoning) can render the cached text differently from what was prefilled. Then, as
llama.cpp's server does, the cells after the last point where a prefill started at or before the
difference are removed and the rest is prefilled again (docs/architecture.md, "Chat templates and
re-rendered history"). Those points are `TextMark`s: the text's offset, the position, and on iSWA
models the sliding-window block then (`seq_rm` alone cannot bring back window cells a later decode
overwrote). Marks only exist after the last media chunk: text before an image cannot be prefilled again
without the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgekv.errors import CompactionError, SessionError
from edgekv.runtime import lib

SWA_MARKS = 2   # marks that keep a sliding-window block (each is the window's cells: MBs on big models)


@dataclass(frozen=True)
class TextMark:
    char: int               # offset in the cached text where a prefill started
    n_past: int             # the position there
    swa: bytes | None = None


class CachedText:
    """`text`: what the cache holds, as the chat template rendered it; `marks`: where prefills started."""

    def __init__(self) -> None:
        self.text = ""
        self.marks: list[TextMark] = []

    def state(self) -> tuple[str, tuple[TextMark, ...]]:
        return self.text, tuple(self.marks)

    def set_state(self, state: tuple[str, tuple[TextMark, ...]]) -> None:
        self.text, marks = state
        self.marks = list(marks)

    def forget_marks(self) -> None:
        """A media chunk was prefilled: the text before it cannot be prefilled again without it."""
        self.marks = []

    def mark(self, cache) -> None:
        """A prefill starts at the end of the text now; older marks beyond the last SWA_MARKS drop their
        sliding-window blocks."""
        swa = cache.swa_state() if cache.model.layout.iswa and cache.n_cells else None
        keep_swa = len(self.marks) - SWA_MARKS
        marks = [m if m.swa is None or i > keep_swa else TextMark(m.char, m.n_past) for i, m in enumerate(self.marks)]
        self.marks = marks + [TextMark(len(self.text), cache.n_past, swa)]

    def sync(self, full: str, cache, stash: Callable[[object], None]) -> int:
        """Make the cache hold a prefix of `full` (the whole conversation rendered again) and return where
        the rest of `full` starts (see the module docstring). A text-only conversation with no usable mark
        starts over (returns 0); one whose difference reaches back into images or compacted cells raises
        SessionError. `stash` receives the whole cache before it is cut (the turn's rollback point)."""
        from edgekv.runtime.cache import PROTECTED

        common = common_prefix(full, self.text)
        if common == len(self.text):
            self.mark(cache)
            return common
        c = cache
        iswa = c.model.layout.iswa
        mark = next((m for m in reversed(self.marks) if m.char <= common and (m.swa is not None or not iswa)), None)
        n_drop = c.n_past - mark.n_past if mark is not None else -1
        tail = slice(c.n_cells - n_drop, None)
        if mark is None or not 0 <= n_drop <= c.n_cells or (c.kind[tail] != PROTECTED).any() or (c.media[tail] >= 0).any():
            if c.n_media or (c.kind != PROTECTED).any():
                raise SessionError("the chat template renders the earlier turns differently from the text the "
                                   "cache holds, back into images or compacted cells that cannot be prefilled "
                                   "again: start a new conversation (/clear)")
            stash(c.state_buffer())   # the turn's rollback point (text only: a plain copy)
            c.reset()
            self.text, self.marks = "", []
            self.mark(c)
            return 0
        stash(c.state_buffer())   # a rolled-back turn gets the cut cells back
        c.drop_tail(mark.n_past, c.n_cells - n_drop)
        if mark.swa is not None and not c.set_swa_state(mark.swa):
            raise CompactionError(f"llama.cpp refused the sliding-window cache of an earlier turn:\n{lib.recent_log()}")
        c.logits, c.window_q, c.window_rows = None, None, 0
        self.marks = [m for m in self.marks if m.char <= mark.char]
        self.text = self.text[:mark.char]
        return mark.char


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
