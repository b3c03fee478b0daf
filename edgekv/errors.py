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
