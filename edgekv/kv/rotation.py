"""llama.cpp's attention rotation of quantized KV caches (its PR #21038), mirrored in one place.

With a quantized K cache type (q8_0, q4_0) llama.cpp multiplies every key and query by a normalised
Walsh-Hadamard matrix H inside attention, so the cache holds rotated keys; a quantized V is stored
rotated too and the attention output is rotated back. H is orthonormal and symmetric (H H = I), so
attention itself is unchanged. For edgekv this means:
- queries captured at `Qcur-<il>` (before the rotation) must be rotated the same way before they meet
  keys read from the state blob (capture.QueryCapture.window does it);
- anything done in RoPE space (Expected Attention) undoes the rotation first (KVView.key_rotation);
- dot products, norms and cosines between cached rows, and weighted means of them (merging,
  re-quantized in the same type), are unchanged: key- or value-only methods need nothing.

The rules, as llama.cpp's `llama_kv_cache` constructor and `build_input_{k,v}_rot` (0.3.36) have them:
- K is rotated when its type is quantized, the cache's layers share one head dim d_k, d_k % 64 == 0,
  and LLAMA_ATTN_ROT_DISABLE (read with atoi when a context is created) is unset or 0.
- K's block n is the largest power of two >= 64 dividing d_k (256 -> 256, 192 -> 64): each head's d_k
  values are cut into consecutive blocks of n, each multiplied by H_n.
- V: the same rule with the V type and d_v, and always blocks of 64.
- H_n is Sylvester's construction [[H, H], [H, -H]] from [[1]], divided by sqrt(n).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgekv.kv.codec import GGML_TYPES, TYPE_IDS

DISABLE_ENV = "LLAMA_ATTN_ROT_DISABLE"
MIN_BLOCK = 64   # llama.cpp rotates nothing smaller; V always uses this block


@lru_cache(maxsize=8)
def hadamard(n: int) -> np.ndarray:
    """[n, n] float64 normalised Sylvester Hadamard matrix (n a power of two): orthonormal, symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(n)
    h.flags.writeable = False
    return h


@dataclass(frozen=True)
class KVRotation:
    """Which cached rows llama.cpp stores rotated, and in blocks of how many values (0: not rotated)."""

    k_block: int = 0
    v_block: int = 0

    @property
    def keys(self) -> bool:
        return self.k_block > 0

    @property
    def values(self) -> bool:
        return self.v_block > 0

    def key_matrix(self, head_dim: int) -> np.ndarray | None:
        """[d, d] R with cached key = RoPE'd key @ R (block-diagonal H_n), or None when keys are as computed."""
        if not self.keys:
            return None
        return np.kron(np.eye(head_dim // self.k_block), hadamard(self.k_block))

    def rotate_queries(self, q: np.ndarray) -> np.ndarray:
        """q [..., d] post-RoPE -> the query attention meets the cached keys with (float32)."""
        if not self.keys:
            return q
        n = self.k_block
        blocks = np.asarray(q, dtype=np.float32).reshape(*q.shape[:-1], q.shape[-1] // n, n)
        return (blocks @ hadamard(n).astype(np.float32)).reshape(q.shape)


def kv_rotation(type_k: str, type_v: str, head_dim_k: int, head_dim_v: int,
                environ: Mapping[str, str] | None = None) -> KVRotation:
    """What llama.cpp will do for a context created now with these cache types (see the module doc)."""
    env = os.environ if environ is None else environ
    if _atoi(env.get(DISABLE_ENV, "")):
        return KVRotation()
    k = _largest_block(head_dim_k) if _quantized(type_k) and head_dim_k % MIN_BLOCK == 0 else 0
    v = MIN_BLOCK if _quantized(type_v) and head_dim_v % MIN_BLOCK == 0 else 0
    return KVRotation(k_block=k, v_block=v)


def _quantized(type_name: str) -> bool:
    return GGML_TYPES[TYPE_IDS[type_name]][1] > 1   # block size > 1: q8_0, q4_0 (not f32/f16/bf16)


def _largest_block(d: int) -> int:
    n = MIN_BLOCK
    while d % (2 * n) == 0:
        n *= 2
    return n


def _atoi(text: str) -> int:
    """C's atoi: leading blanks, a sign and digits; anything else is 0."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0
