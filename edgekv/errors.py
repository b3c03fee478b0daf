"""Errors a user can act on. The CLI prints their message and exits with `exit_code`, never a traceback."""
from __future__ import annotations


class EdgeKVError(Exception):
    """A clear, user-facing failure (bad file, bad option, unsupported model). CLI exit code 2."""

    exit_code = 2


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
