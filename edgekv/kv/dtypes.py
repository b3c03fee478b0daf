"""Cache rows <-> float32. f32/f16/bf16 are views; q8_0/q4_0 go through gguf.quants (ggml's reference
quantizers), so merged slots are re-quantized the way llama.cpp would write them."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants

from edgekv.kv.codec import GGML_TYPES, row_elements, type_name

_QUANT = {2: GGMLQuantizationType.Q4_0, 8: GGMLQuantizationType.Q8_0, 30: GGMLQuantizationType.BF16}


def to_float(rows: np.ndarray, type_id: int) -> np.ndarray:
    """uint8 [n, row_bytes] of `type_id` -> float32 [n, n_embd]."""
    type_name(type_id)
    n, m = rows.shape[0], row_elements(type_id, rows.shape[1])
    rows = np.ascontiguousarray(rows)
    if n == 0:
        return np.zeros((0, m), np.float32)
    if type_id == 0:
        return rows.view(np.float32).reshape(n, m).copy()
    if type_id == 1:
        return rows.view(np.float16).reshape(n, m).astype(np.float32)
    if type_id == 30:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(n, m)
    return quants.dequantize(rows, _QUANT[type_id]).reshape(n, m).astype(np.float32, copy=False)


def from_float(x: np.ndarray, type_id: int) -> np.ndarray:
    """float32 [n, n_embd] -> uint8 [n, row_bytes] of `type_id` (round to nearest, as ggml does)."""
    type_name(type_id)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    _, blck, size = GGML_TYPES[type_id]
    if n == 0:
        return np.zeros((0, x.shape[1] // blck * size), np.uint8)
    if type_id == 0:
        return x.view(np.uint8).reshape(n, -1).copy()
    if type_id == 1:
        return x.astype(np.float16).view(np.uint8).reshape(n, -1)
    return np.ascontiguousarray(quants.quantize(x, _QUANT[type_id])).view(np.uint8).reshape(n, -1)


def bytes_per_head(type_id: int, row_bytes: int, n_heads: int) -> int | None:
    """Bytes of one head's slice of a row, or None when a head does not span whole blocks (then a head
    cannot be copied as bytes and must be converted)."""
    _, blck, size = GGML_TYPES[type_id]
    n_embd = row_elements(type_id, row_bytes)
    if n_embd % n_heads:
        return None
    d = n_embd // n_heads
    return d // blck * size if d % blck == 0 else None
