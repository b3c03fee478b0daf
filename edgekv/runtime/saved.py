"""A conversation in one file: the compacted cache, its bookkeeping and the messages, behind a header that
says which model, cache types and versions wrote it (how an app reopens yesterday's chat about a 4k
image without encoding it again).

Layout (little-endian):
    b"EDGEKVCV"  u32 format  u32 header length  header (UTF-8 JSON)
    u64 blob length  blob (llama_state_seq_get_data of sequence 0)
    u64 arrays length  arrays (numpy .npz, no pickles: kinds, media, logits, window queries)

The header is checked against the loading model before llama.cpp sees a byte, and the blob is parsed by
our own codec first: a file from another model, cache type or llama.cpp build is a SaveFormatError, not a
llama.cpp abort.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct
from pathlib import Path

import numpy as np

from edgekv.errors import SaveFormatError, StateFormatError

MAGIC = b"EDGEKVCV"
FORMAT = 1
HASH_BYTES = 8 << 20  # the model's identity: size + sha256 of its first 8 MiB (header, metadata, first tensors)


def file_identity(path: Path | None) -> dict | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(HASH_BYTES))
    return {"name": Path(path).name, "size": os.path.getsize(path), "sha256_head": h.hexdigest()}


def model_identity(model) -> dict:
    """What must match for a saved cache to mean the same thing on this model (computed once per model)."""
    ident = model.identity
    if ident is None:
        import llama_cpp

        from edgekv.version import __version__

        ident = {"model": file_identity(model.path), "mmproj": file_identity(model.mmproj_path),
                 "arch": model.layout.arch, "cache_type_k": model.cache_type_k, "cache_type_v": model.cache_type_v,
                 "flash_attn": model.flash_attn, "llama_cpp_python": llama_cpp.__version__, "edgekv": __version__}
        model.identity = ident
    return ident


def save(session, path: str | os.PathLike) -> Path:
    """Write the session's conversation to `path` (atomically: a crash leaves the old file)."""
    path = Path(path).expanduser()
    c = session.cache
    blob = session.state_blob()
    header = {
        "format": FORMAT, **model_identity(session.model),
        "n_cells": c.n_cells, "n_past": c.n_past, "n_media": c.n_media, "window_rows": c.window_rows,
        "queries_rotated": True,   # window_q in the cache's key basis (kv/rotation.py)
        "messages": session.messages, "in_cache_text": session.history.text,
        "settings": {"method": session.method_name, "method_kwargs": session.method_kwargs,
                     "budget": session.budget, "compress": session.compress,
                     "window": session.window, "seed": session.seed, "auto_compact": session.auto_compact,
                     "early_compact": session.early_compact},
        "counters": {"prompt": list(session.prefiller.counts()), "generation_tokens": session.generation_tokens,
                     "generation_seconds": session.generation_seconds},
        "reports": [dataclasses.asdict(r) for r in session.reports],
    }
    arrays = {"kind": c.kind, "media": c.media}
    if c.logits is not None:
        arrays["logits"] = c.logits
    if c.window_q is not None:
        arrays["window_q"] = c.window_q
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        head = json.dumps(header, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise SaveFormatError(f"cannot save this conversation: {e}") from None
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<II", FORMAT, len(head)) + head)
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.write(struct.pack("<Q", buf.getbuffer().nbytes) + buf.getvalue())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SaveFormatError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def read(path: str | os.PathLike) -> tuple[dict, bytes, dict]:
    """(header, blob, arrays) of a saved conversation; SaveFormatError if it is not one or is cut short."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SaveFormatError(f"cannot read {path}: {e.strerror or e}") from None
    if not data.startswith(MAGIC):
        raise SaveFormatError(f"{path} is not a saved edgekv conversation")
    try:
        fmt, n = struct.unpack_from("<II", data, len(MAGIC))
        if fmt != FORMAT:
            raise SaveFormatError(f"{path} was saved in conversation format {fmt}; this edgekv reads {FORMAT}")
        off = len(MAGIC) + 8
        header = json.loads(data[off:off + n].decode("utf-8"))
        off += n
        (nb,) = struct.unpack_from("<Q", data, off)
        blob = data[off + 8:off + 8 + nb]
        off += 8 + nb
        (na,) = struct.unpack_from("<Q", data, off)
        raw = data[off + 8:off + 8 + na]
        if len(blob) != nb or len(raw) != na:
            raise ValueError("truncated")
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except SaveFormatError:
        raise
    except Exception as e:
        raise SaveFormatError(f"{path} is damaged or cut short ({type(e).__name__}: {e})") from None
    return header, blob, arrays


def check_compatible(header: dict, model, path) -> None:
    """Refuse, with the reason, a file another model, projector, cache type or version wrote."""
    ident = model_identity(model)
    checks = [("model", "a different model file"), ("mmproj", "a different projector (mmproj)"),
              ("cache_type_k", "another K cache type"), ("cache_type_v", "another V cache type"),
              ("flash_attn", "another flash-attention setting (the V layout differs)"),
              ("llama_cpp_python", "another llama-cpp-python (its state layout is version-specific)")]
    for key, what in checks:
        if header.get(key) != ident[key]:
            raise SaveFormatError(f"{path} was saved with {what}: saved {_show(header.get(key))}, "
                                  f"loaded {_show(ident[key])}")
    if header["n_cells"] > model.n_ctx:
        raise SaveFormatError(f"{path} holds {header['n_cells']} cells but the context has {model.n_ctx}: "
                              "raise -c/--ctx-size")


def restore_into(session, header: dict, blob: bytes, arrays: dict, path) -> None:
    """Write the saved cache and bookkeeping into a fresh session of a compatible model."""
    from edgekv.runtime.cache import CacheMarks
    from edgekv.runtime.cache import CompactionReport

    c = session.cache
    try:
        state = c.parse(blob, ledger=False)  # our codec first: llama.cpp asserts on some malformed blobs
    except StateFormatError as e:
        raise SaveFormatError(f"{path}: the saved cache does not fit this model ({e})") from None
    kind, media = arrays["kind"].astype(np.int8), arrays["media"].astype(np.int32)
    if state.blocks[0].n_cells != header["n_cells"] or kind.shape != (header["n_cells"],) or media.shape != kind.shape:
        raise SaveFormatError(f"{path} is inconsistent: its cache and its bookkeeping disagree")
    if not c.set_state(blob):
        c.reset()
        raise SaveFormatError(f"llama.cpp refused the saved cache in {path}")
    logits = arrays.get("logits")
    if logits is not None and logits.shape != (session.model.n_vocab,):
        raise SaveFormatError(f"{path}: saved logits do not match this vocabulary")
    window_q = arrays.get("window_q")
    if window_q is not None and session.model.rotation.keys and not header.get("queries_rotated"):
        window_q = None   # saved before queries were rotated like the keys: a probe stands in if needed
    c.set_marks(CacheMarks(int(header["n_past"]), kind, media, int(header["n_media"]), window_q,
                           int(header["window_rows"]) if window_q is not None else 0, logits,
                           pos=state.blocks[0].pos.astype(np.int64)))
    session.messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in header["messages"]]
    session.history.text = header["in_cache_text"]
    counters = header.get("counters", {})
    session.prefiller.set_counts(tuple(counters.get("prompt", (0, 0.0, 0, 0.0))))
    session.generation_tokens = int(counters.get("generation_tokens", 0))
    session.generation_seconds = float(counters.get("generation_seconds", 0.0))
    session.reports[:] = [CompactionReport.from_dict(r) for r in header.get("reports", [])]


def _show(v) -> str:
    if isinstance(v, dict) and "name" in v:
        return f"{v['name']} ({v['size']} bytes, sha256 of the first 8 MiB {v['sha256_head'][:12]}..)"
    return repr(v)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot save {type(o).__name__} in a conversation header")


def load_session(cls, model, path, **session_kwargs):
    """A new `cls` session on `model` holding the conversation saved at `path` (Session.load)."""
    header, blob, arrays = read(path)
    check_compatible(header, model, path)
    session = cls(model, **{**header.get("settings", {}), **session_kwargs})
    try:
        restore_into(session, header, blob, arrays, path)
    except BaseException:
        session.close()
        raise
    return session


def replace_conversation(session, path) -> None:
    """Session.load_conversation: the saved conversation replaces the session's; on any error the session's
    own is put back as it was."""
    header, blob, arrays = read(path)
    check_compatible(header, session.model, path)
    before = session.snapshot()
    reports, counts = list(session.reports), session.prefiller.counts()
    gen = (session.generation_tokens, session.generation_seconds)
    try:
        restore_into(session, header, blob, arrays, path)
    except BaseException:
        session.restore(before)
        session.reports[:] = reports
        session.prefiller.set_counts(counts)
        session.generation_tokens, session.generation_seconds = gen
        raise
