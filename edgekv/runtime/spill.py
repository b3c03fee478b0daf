"""A context's state as a file (llama_state_seq_save_file / load_file), for re-selections with a disk recall
store (docs/recall.md, "Memory"): the context as read, which is also the turn's rollback point, and the
context written in its place stay on disk, and llama.cpp reads and writes them a layer at a time, so host
memory never holds either blob whole."""
from __future__ import annotations

import ctypes
import os
import tempfile
import weakref
from pathlib import Path

from edgekv.errors import StateFormatError
from edgekv.runtime.lib import llama_cpp


class StateFile:
    """A sequence state file; removed when closed or garbage collected (and at exit)."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        fd, name = tempfile.mkstemp(prefix="edgekv-context-", suffix=".seq", dir=folder)
        os.close(fd)
        self.path = Path(name)
        self._finalizer = weakref.finalize(self, _unlink, self.path)

    def close(self) -> None:
        self._finalizer()

    def __repr__(self) -> str:
        return f"StateFile({self.path})"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def save(ctx, seq: int, folder: str | os.PathLike | None) -> StateFile:
    """Sequence `seq` of the context into a new state file in `folder` (None: the system temp folder)."""
    f = StateFile(folder)
    if not llama_cpp.llama_state_seq_save_file(ctx, str(f.path).encode(), seq, None, 0):
        f.close()
        raise StateFormatError(f"llama.cpp could not write the context's state to {f.path}")
    return f


def load(ctx, f: StateFile, seq: int = 0) -> bool:
    """Replace sequence `seq` with the state file's (llama.cpp clears the sequence first)."""
    tokens = (llama_cpp.llama_token * 1)()   # a None buffer would only count the tokens
    n_tokens = ctypes.c_size_t(0)
    return llama_cpp.llama_state_seq_load_file(ctx, str(f.path).encode(), seq, tokens, 1,
                                               ctypes.byref(n_tokens)) > 0
