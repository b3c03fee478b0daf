"""The llama.cpp libraries, loaded once: llama_cpp, mtmd_cpp, and the few ggml symbols we bind ourselves.

llama.cpp logs a lot to stderr; we keep its recent lines in a ring buffer (shown with an error when a
call fails, or live with EDGEKV_VERBOSE=1) instead of spraying them over the user's terminal.
"""
from __future__ import annotations

import collections
import ctypes
import os
import threading

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp  # noqa: E402
from llama_cpp import mtmd_cpp  # noqa: E402
from llama_cpp._ggml import libggml  # noqa: E402  (libggml-base, shipped in llama_cpp/lib)

_init_lock = threading.Lock()
_initialised = False
LOG_LINES: collections.deque[str] = collections.deque(maxlen=200)
VERBOSE = os.environ.get("EDGEKV_VERBOSE", "") not in ("", "0")


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    s = text.decode("utf-8", errors="replace") if text else ""
    LOG_LINES.append(s)
    if VERBOSE:
        os.write(2, text or b"")


def init() -> None:
    """llama_backend_init once per process, with llama.cpp's (and mtmd's) logs captured."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        for name in ("mtmd_log_set", "mtmd_helper_log_set"):
            if hasattr(mtmd_cpp, name):
                getattr(mtmd_cpp, name)(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


def recent_log(n: int = 8) -> str:
    """The last n non-empty llama.cpp log lines, for error messages."""
    lines = [l.strip() for l in LOG_LINES if l.strip() and l.strip() != "."]
    return "\n".join(lines[-n:])


# --- ggml: just enough to read a tensor inside the eval callback -------------------------------------
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_OP_PARAMS = 64


class ggml_tensor(ctypes.Structure):
    """Mirror of `struct ggml_tensor` (ggml.h, ggml 0.25.x). sizeof = 336 on x86-64/arm64, checked at
    import against ggml_tensor_overhead() - sizeof(ggml_object)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
libggml.ggml_backend_tensor_get.restype = None
libggml.ggml_op_name.argtypes = [ctypes.c_int]
libggml.ggml_op_name.restype = ctypes.c_char_p
libggml.ggml_tensor_overhead.argtypes = []
libggml.ggml_tensor_overhead.restype = ctypes.c_size_t
libggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
libggml.ggml_nbytes.restype = ctypes.c_size_t

GGML_OBJECT_SIZE = 32
TENSOR_LAYOUT_OK = libggml.ggml_tensor_overhead() == GGML_OBJECT_SIZE + ctypes.sizeof(ggml_tensor)


def op_name(op: int) -> str:
    return (libggml.ggml_op_name(op) or b"").decode()


def tensor_get(t: int, dst: ctypes.c_void_p, nbytes: int) -> None:
    libggml.ggml_backend_tensor_get(t, dst, 0, nbytes)


def tensor_nbytes(t: int) -> int:
    return int(libggml.ggml_nbytes(t))


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim   # glibc; macOS and musl have none (nothing to do there)
    except (AttributeError, OSError):
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`). A compaction frees many
    layer-sized temporaries that glibc keeps resident; a new state blob is a fresh mapping, so without
    this they would add to the peak RSS when the whole context is written (docs/recall.md, "Memory")."""
    if _TRIM is not None:
        _TRIM(0)
