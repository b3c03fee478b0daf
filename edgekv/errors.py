"""Errors a user can act on. The CLI prints their message and exits with `exit_code`, never a traceback."""
from __future__ import annotations

import copy

CTX_OPTION = "-c/--ctx-size"  # the option a "does not fit" hint names (EdgeKVError.under swaps it)


class EdgeKVError(Exception):
    """A clear, user-facing failure (bad file, bad option, unsupported model). CLI exit code 2.

    log: llama.cpp's recent log lines behind the failure, kept apart from the message (the CLI prints them
    before the `Error:` line, so that line is the last thing the user sees)."""

    exit_code = 2

    def __init__(self, *args, log: str = "") -> None:
        super().__init__(*args)
        self.log = log

    def under(self, option: str) -> "EdgeKVError":
        """The same error with its hint naming `option` in place of -c/--ctx-size (--max-kv-cells sets the
        context instead of -c, so "raise -c" would send the user to a flag that changes nothing)."""
        e = copy.copy(self)  # the same class and attributes (subclasses may take other arguments)
        e.args = (str(self).replace(CTX_OPTION, option),)
        return e


def error_lines(e: BaseException) -> list[str]:
    """What the CLI prints for `e`: its log and any detail lines first, the one `Error:` line last. A message
    of several lines ("...:" + llama.cpp's log) has its first line as the headline."""
    head, _, detail = str(e).strip().partition("\n")
    before = [ln for ln in (getattr(e, "log", "") + "\n" + detail).splitlines() if ln.strip()]
    return before + [f"Error: {head.rstrip(':') if before else head}"]


class ModelLoadError(EdgeKVError):
    """A model or mmproj file is missing, corrupt, or the two do not match."""


class MediaError(EdgeKVError):
    """An image or video cannot be read or is not supported by the projector."""


class BudgetError(EdgeKVError):
    """A compression budget is out of range."""


class ContextOverflowError(EdgeKVError):
    """The prompt (media included) does not fit the context size."""


class StateFormatError(EdgeKVError):
    """A KV state blob this version of edgekv does not understand (other llama.cpp, other layout)."""


class CompactionError(EdgeKVError):
    """llama.cpp refused the compacted state; the original cache was restored."""


class Cancelled(EdgeKVError):
    """`Session.cancel()` stopped a prefill; the conversation is as it was before the turn."""


class SessionError(EdgeKVError):
    """A session used in a way that would corrupt it: after close, on a closed model, or a second
    live session on one model (they would share, and clear, one llama.cpp sequence)."""


class SaveFormatError(EdgeKVError):
    """A saved conversation that does not match this model, cache types or edgekv version."""
