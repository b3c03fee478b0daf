"""Queries of the observation window as attention meets the cached keys, read from llama.cpp's graph
with the eval callback.

llama.cpp calls `cb_eval(tensor, ask=True)` for every graph node; answering True makes the scheduler
compute up to that node and call again with ask=False, when we copy the data out (buffers are reused).
`Qcur-<il>` appears three times per layer (MUL_MAT, RESHAPE, ROPE): we take the ROPE one. The callback
is disarmed except for the last prompt ubatch: idle, it answers False at once.

Model-specific scaling happens after this node (Gemma scales Q later), so the attention scale comes
from the model's hyper-parameters (`ModelLayout.attn_scale`), not from here. On a quantized K cache
llama.cpp rotates Q (and K, before storing it) by a Hadamard matrix after this node too: `window()`
applies that rotation (`rotation`, set by the Model with its context), so the window meets the keys of
the state blob as attention does (edgekv.kv.rotation).
"""
from __future__ import annotations

import ctypes

import numpy as np

from edgekv.kv.rotation import KVRotation
from edgekv.runtime.lib import ggml_tensor, llama_cpp, op_name, tensor_get

GGML_TYPE_F32 = 0


class QueryCapture:
    """Arm for one decode call; collects `Qcur-<il>` (post-RoPE) rows, plus optional probes."""

    rotation: KVRotation = KVRotation()   # llama.cpp's rotation of the context's K cache (Model sets it)

    def __init__(self, layout) -> None:
        self.layout = layout
        self.armed = False
        self.keep_rows = 0
        self.queries: dict[int, np.ndarray] = {}   # model layer -> [rows, n_head, head_dim]
        self.extra_prefixes: tuple[bytes, ...] = ()  # tests: also copy e.g. b"kq_soft_max"
        self.extra: dict[str, np.ndarray] = {}
        self.probe_kv = False                       # record attention window sizes (n_kv) only
        self.n_kv: dict[str, int] = {}   # attention node name -> n_kv
        self.error: str | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)

    def arm(self, keep_rows: int) -> None:
        """Capture the last `keep_rows` token rows of Q in every layer during the next decode."""
        self.armed, self.keep_rows, self.queries, self.error = True, keep_rows, {}, None

    def disarm(self) -> None:
        self.armed = False

    def _cb(self, t_ptr: int, ask: bool, user_data) -> bool:
        if not (self.armed or self.probe_kv):
            return not ask  # ask -> "not interested"; otherwise -> "continue"
        try:
            t = ggml_tensor.from_address(t_ptr)
            name = t.name
            if self.probe_kv:
                # kq-<il> [n_kv, n_tokens, n_head] without flash attention; FLASH_ATTN_EXT's K (src[1]) with it
                fattn = not name.startswith(b"kq-") and op_name(t.op) == "FLASH_ATTN_EXT"
                if name.startswith(b"kq-") or fattn:
                    if ask:
                        return True
                    n_kv = ggml_tensor.from_address(t.src[1]).ne[1] if fattn else t.ne[0]
                    self.n_kv[name.decode()] = int(n_kv)
                    return True
            if not self.armed:
                return not ask
            if name.startswith(b"Qcur-") and name[5:].isdigit():
                if op_name(t.op) != "ROPE":
                    return not ask
                if ask:
                    return True
                self._copy_q(t_ptr, t, int(name[5:]))
                return True
            for p in self.extra_prefixes:
                if name.startswith(p):
                    if ask:
                        return True
                    self.extra[name.decode()] = _read(t_ptr, t)
                    return True
            return not ask
        except Exception as e:  # never let an exception cross into C
            self.error = f"{type(e).__name__}: {e}"
            return not ask

    def _copy_q(self, t_ptr: int, t: ggml_tensor, il: int) -> None:
        q = _read(t_ptr, t)  # [n_tokens, n_head, head_dim]
        self.queries[il] = q[-self.keep_rows:].copy() if self.keep_rows else q

    def window(self, layers: list[int]) -> np.ndarray | None:
        """[L, H, W, d] for the given model layers, in the basis of the cached keys (rotated like them on a
        quantized K cache), or None if any layer is missing."""
        if self.error or not self.queries or any(il not in self.queries for il in layers):
            return None
        q = np.stack([self.queries[il].transpose(1, 0, 2) for il in layers]).astype(np.float32)
        return self.rotation.rotate_queries(q)


def _read(t_ptr: int, t: ggml_tensor) -> np.ndarray:
    """A contiguous f32 tensor as numpy, ggml's ne reversed into C order."""
    if t.type != GGML_TYPE_F32:
        raise TypeError(f"tensor {t.name!r} is not f32")
    ne = [int(x) for x in t.ne]
    expect = 4
    for i in range(4):
        if t.nb[i] != expect and ne[i] > 1:
            raise ValueError(f"tensor {t.name!r} is not contiguous")
        expect *= ne[i]
    out = np.empty(ne[::-1], dtype=np.float32)
    tensor_get(t_ptr, out.ctypes.data_as(ctypes.c_void_p), out.nbytes)
    return out[0] if ne[3] == 1 else out
