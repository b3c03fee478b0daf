"""The view a method reads: `KVView` (the cache's K/V as read-only arrays, the candidates, the spans and the
captured query window) and the window attention computed from it. Pure numpy.

Shapes: L layers of the compressed cache block, H_kv KV heads, H query heads (group g = H / H_kv),
T tokens (cells) in position order, d head dim, W captured query-window length (last W prompt tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

import numpy as np

from edgekv.methods.parallel import parallel_map

Modality = Literal["text", "media"]


@dataclass(frozen=True)
class Span:
    """Tokens [start, stop) of one prompt piece. `media_index` numbers images/frames (-1 for text)."""

    start: int
    stop: int
    kind: Modality
    media_index: int = -1


@dataclass(eq=False)
class KVView:
    """What a method may look at. Arrays are read-only float32.

    keys, values: [L, H_kv, T, d] post-RoPE K and V as cached, tokens in position order (an ndarray, or
                  an array-like that makes a layer when indexed by layer and the whole array for any
                  other use: index by layer where you can). On a quantized
                  cache llama.cpp stores them Hadamard-rotated over d (edgekv.kv.rotation): norms, dot
                  products, cosines and weighted means of rows are as without it.
    candidates:   [T] bool, tokens the method may evict or merge (the media spans by default). Every
                  other token is protected: the packer keeps it at its true position in every layer.
    spans:        the prompt pieces covering [0, T) with their modality.
    queries:      [L, H, W, d] post-RoPE queries of the last W prompt tokens (the observation window,
                  the tail of the question), in the keys' basis (rotated like them), or None when no
                  window was captured (flash attention callers that skip capture, multi-turn before the
                  question is known).
    scale:        attention scale from the model's hyper-parameters (1/sqrt(d) for most models).
    positions:    [T] logical positions (labels) of the tokens.
    seed:         for methods that draw random numbers.
    rope_base, rope_neox: the RoPE of the compressed layers (methods that un-rotate queries: `expected`).
    key_rotation: [d, d] orthonormal R with keys and queries = their RoPE-space vectors @ R (llama.cpp's
                  rotation of a quantized K cache), or None (identity). Only work in RoPE space needs it.
    window_outside: the window's queries come after every token of the view (a view of one media chunk
                  planned with a probe window after it): no causal mask inside the view, and each query's
                  attention is normalised over the view's tokens alone (Method.plans_on_chunk).
    """

    keys: np.ndarray
    values: np.ndarray
    candidates: np.ndarray
    spans: tuple[Span, ...] = ()
    queries: np.ndarray | None = None
    scale: float | None = None
    positions: np.ndarray | None = None
    seed: int = 0
    rope_base: float | None = None
    rope_neox: bool = True
    window_outside: bool = False
    key_rotation: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.keys.ndim != 4 or self.keys.shape != self.values.shape:
            raise ValueError(f"keys/values must be [L, H_kv, T, d] of one shape, got {self.keys.shape} "
                             f"and {self.values.shape}")
        if self.candidates.shape != (self.n_tokens,):
            raise ValueError(f"candidates must be [T={self.n_tokens}], got {self.candidates.shape}")
        if self.queries is not None:
            L, H, W, d = self.queries.shape
            if L != self.n_layers or d != self.head_dim or H % self.n_kv_heads or (
                    W > self.n_tokens and not self.window_outside):
                raise ValueError(f"queries {self.queries.shape} do not fit keys {self.keys.shape}")
        if self.key_rotation is not None and self.key_rotation.shape != (self.head_dim, self.head_dim):
            raise ValueError(f"key_rotation must be [d, d] = {(self.head_dim,) * 2}, got {self.key_rotation.shape}")
        if self.scale is None:
            self.scale = 1.0 / float(np.sqrt(self.head_dim))
        if self.positions is None:
            self.positions = np.arange(self.n_tokens)
        if not self.spans:
            self.spans = (Span(0, self.n_tokens, "media"),)
        for a in (self.keys, self.values, self.candidates):   # (keys/values may be lazy array-likes)
            if isinstance(a, np.ndarray) and a.flags.writeable and a.flags.owndata:
                a.flags.writeable = False

    # --- shapes ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def n_candidates(self) -> int:
        return int(self.candidates.sum())

    @property
    def window(self) -> int:
        return 0 if self.queries is None else self.queries.shape[2]

    @cached_property
    def candidate_index(self) -> slice | np.ndarray:
        """The candidates as a slice when they are one contiguous run (the usual single media span),
        else as an index array: x[..., view.candidate_index] is then a view, not a gathered copy."""
        idx = np.flatnonzero(self.candidates)
        if idx.size and idx[-1] - idx[0] + 1 == idx.size:
            return slice(int(idx[0]), int(idx[-1]) + 1)
        return idx

    @cached_property
    def media_mask(self) -> np.ndarray:
        """[T] bool, True on media (image/frame) tokens."""
        m = np.zeros(self.n_tokens, dtype=bool)
        for s in self.spans:
            if s.kind == "media":
                m[s.start:s.stop] = True
        return m

    # --- attention of the observation window ----------------------------------------------------
    @cached_property
    def window_attention(self) -> np.ndarray:
        """[L, H_kv, W, T] A = softmax(Q K^T * scale) of the window queries, causal, GQA-averaged.

        Query j is token T-W+j and sees keys 0..T-W+j. With flash attention on, llama.cpp never
        materialises these probabilities, so they are recomputed here from the captured queries.
        Methods use the reductions `window_scores` and `window_media_mass`, which never hold this
        [L, H_kv, W, T] tensor (118 MB at 7B shape, 8k tokens); it is here for inspection and tests.
        """
        out = np.zeros((self.n_layers, self.n_kv_heads, self.window, self.n_tokens), dtype=np.float32)
        self._window_pass(out)
        out.flags.writeable = False
        return out

    @property
    def window_scores(self) -> np.ndarray:
        """[L, H_kv, T] sum_j A[j -> t]: the attention each key gets from the whole window."""
        return self._window_reductions[0]

    @property
    def window_media_mass(self) -> np.ndarray:
        """[L, H_kv, W] sum_{t media} A[j -> t]: each window query's attention mass on media keys."""
        return self._window_reductions[1]

    @cached_property
    def _window_reductions(self) -> tuple[np.ndarray, np.ndarray]:
        return self._window_pass(None)

    def _window_pass(self, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One [g*W, T] softmax block per (layer, KV head), spread over the planning threads
        (`parallel_map`), each reduced to its column sums and media masses (and copied to `rows`)."""
        if self.queries is None:
            raise ValueError("this method needs a captured query window (view.queries is None)")
        L, Hk, W, T = self.n_layers, self.n_kv_heads, self.window, self.n_tokens
        scores = np.zeros((L, Hk, T), dtype=np.float32)
        media_mass = np.zeros((L, Hk, W), dtype=np.float32)
        media = self.media_mask.astype(np.float32)

        def block(job: tuple[int, int], scratch: np.ndarray) -> None:
            p, inv = _window_softmax(self, job[0], job[1], scratch)         # [W*g, T], [W*g]
            np.matmul(inv, p, out=scores[job])                              # sum over the window
            media_mass[job] = (inv * (p @ media)).reshape(W, -1).sum(axis=1)
            if rows is not None:
                np.matmul(inv.reshape(W, 1, -1), p.reshape(W, -1, T), out=rows[job].reshape(W, 1, T))

        parallel_map(block, [(layer, h) for layer in range(L) for h in range(Hk)],
                     scratch=(self.queries.shape[1] // Hk * W, T))
        release = getattr(self.keys, "release", None)   # the runtime's LayerFloats: drop the heads it made
        if release is not None:
            release()
        scores.flags.writeable = media_mass.flags.writeable = False
        return scores, media_mass


def _window_softmax(view: KVView, layer: int, h: int, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p [W*g, T] unnormalised causal softmax rows of KV head h's g query heads, rows ordered
    (window query j, head i), in `scratch`; inv [W*g] = 1 / (g * row sum)), so that
    A[j] = sum_i inv[j, i] * p[(j, i)] is the GQA-mean attention of window query j."""
    _, H, W, d = view.queries.shape
    T, g = view.n_tokens, H // view.n_kv_heads
    q = view.queries[layer, h * g:(h + 1) * g].transpose(1, 0, 2).reshape(W * g, d)
    q = np.multiply(q, view.scale, dtype=np.float32)
    p = np.matmul(q, view.keys[layer, h].T, out=scratch)                              # logits
    if not view.window_outside:
        p.reshape(W, g, T)[:, :, T - W:][_future_mask(W, g)] = -np.inf
    p -= p.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    return p, (1.0 / (g * p.sum(axis=1))).astype(np.float32)


@lru_cache(maxsize=8)
def _future_mask(W: int, g: int) -> np.ndarray:
    """[W, g, W] True where window key j comes after window query i (same for all g heads)."""
    future = np.triu(np.ones((W, W), dtype=bool), 1)
    return np.ascontiguousarray(np.broadcast_to(future[:, None, :], (W, g, W)))
