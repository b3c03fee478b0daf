"""`expected`: Expected Attention, the attention future queries are expected to pay each key.

Paper: Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future
Queries Distribution", 2025, https://arxiv.org/abs/2510.00636 (kvpress ExpectedAttentionPress; written
here from the paper's formulas, not ported).

Per layer l and query head h, from the captured window queries (post-RoPE, at known positions):
    q~_j       = R(p_j)^-1 q_j                       un-rotated (pre-RoPE) window queries
    mu, Sigma  = mean and covariance of q~_j          (the query distribution, Gaussian)
    Rbar       = mean_{i=1..F} R(p_last + i)           average rotation over the next F positions
    mu', S'    = Rbar mu, Rbar Sigma Rbar^T
    z_t        = scale * k_t . mu' + scale^2 / 2 * k_t^T S' k_t   (log E[exp(scale q.k_t)], q ~ N)
    a_t        = softmax_t(z_t)                       expected attention over the cached keys
score_{l,kv}(t) = (mean over the group's query heads of a_t + epsilon) * ||v_t||  (use_vnorm);
the first `n_sink` tokens are kept (attention sinks). RoPE pairs follow the model (NEOX or normal).
On a quantized K cache the keys and window queries come Hadamard-rotated after RoPE (view.key_rotation,
G): the queries are taken back to RoPE space (q G^T) before the above, and mu', S' are carried into the
keys' basis (mu' G, G^T S' G) after it, so k_t . mu' is the same product as without the rotation.

In the compress-before-question regime the window is what is there: the question if known, a probe
(runtime/probe.py), or the document's own last tokens. docs/probe-windows.md measured the last of these on
Gemma 3 270M at chance (filler queries do not predict which fact is asked); docs/probe-windows.md has the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, ScoreMethod
from edgekv.methods.registry import register


def rope_angles(positions: np.ndarray, d: int, base: float) -> np.ndarray:
    """[P, d/2] rotation angles of each pair at each position."""
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    return np.asarray(positions, np.float64)[:, None] * inv[None, :]


def _pairs(x: np.ndarray, neox: bool) -> tuple[np.ndarray, np.ndarray]:
    d = x.shape[-1]
    return (x[..., : d // 2], x[..., d // 2:]) if neox else (x[..., 0::2], x[..., 1::2])


def _join(a: np.ndarray, b: np.ndarray, neox: bool) -> np.ndarray:
    if neox:
        return np.concatenate([a, b], axis=-1)
    out = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    out[..., 0::2], out[..., 1::2] = a, b
    return out


def unrotate(q: np.ndarray, positions: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """q [..., W, d] post-RoPE at `positions` [W] -> pre-RoPE (rotate by -angle)."""
    ang = rope_angles(positions, q.shape[-1], base)
    c, s = np.cos(ang), np.sin(ang)
    x, y = _pairs(q.astype(np.float64), neox)
    return _join(x * c + y * s, -x * s + y * c, neox)


def rotate(q: np.ndarray, positions: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """The inverse of `unrotate`: apply RoPE at `positions`."""
    ang = rope_angles(positions, q.shape[-1], base)
    c, s = np.cos(ang), np.sin(ang)
    x, y = _pairs(q.astype(np.float64), neox)
    return _join(x * c - y * s, x * s + y * c, neox)


def mean_rotation(start: int, n: int, d: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """(cbar, sbar) [d/2]: the average of the 2x2 rotations [[c, -s], [s, c]] over positions start..start+n-1."""
    ang = rope_angles(np.arange(start, start + n), d, base)
    return np.cos(ang).mean(axis=0), np.sin(ang).mean(axis=0)


def _rotate_matrix(cb: np.ndarray, sb: np.ndarray, d: int, neox: bool) -> np.ndarray:
    """[d, d] the block-diagonal average rotation Rbar in the model's pair layout."""
    R = np.zeros((d, d))
    h = d // 2
    for i in range(h):
        a, b = (i, i + h) if neox else (2 * i, 2 * i + 1)
        R[a, a], R[a, b], R[b, a], R[b, b] = cb[i], -sb[i], sb[i], cb[i]
    return R


@register("expected")
@dataclass
class ExpectedAttention(ScoreMethod):
    n_future: int = 512          # future positions the rotation is averaged over (kvpress default)
    n_sink: int = 4              # first tokens always kept (kvpress default)
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    name = "expected"
    paper = "https://arxiv.org/abs/2510.00636"
    needs_queries = True

    def __post_init__(self) -> None:
        if self.n_future < 1 or self.n_sink < 0 or self.epsilon < 0:
            raise ValueError("n_future >= 1, n_sink >= 0, epsilon >= 0")

    def score(self, view: KVView) -> np.ndarray:
        if view.queries is None:
            raise ValueError("expected attention needs captured queries (a question, probe or document window)")
        L, Hk, T, d = view.keys.shape
        q = view.queries                                         # [L, H, W, d]
        H, W = q.shape[1], q.shape[2]
        g = H // Hk
        base = float(view.rope_base or 10000.0)
        pos_w = np.asarray(view.positions)[T - W:]
        G = view.key_rotation                                    # cached basis = RoPE space @ G
        if G is not None:
            q = q @ G.T                                          # back to RoPE space (G orthonormal)
        q0 = unrotate(q, pos_w, base, view.rope_neox)            # [L, H, W, d]
        mu = q0.mean(axis=2)                                     # [L, H, d]
        R = _rotate_matrix(*mean_rotation(int(pos_w[-1]) + 1, self.n_future, d, base), d, view.rope_neox)
        mu_r = mu @ R.T                                          # [L, H, d]
        scale = float(view.scale)
        C_r = None
        if self.use_covariance and W > 1:
            # Sigma' = R Sigma R^T with Sigma = C^T C / (W - 1): k^T Sigma' k = |C R^T k|^2 / (W - 1), which
            # costs W (not d) multiply-adds per key and head (rank <= W - 1)
            C_r = (q0 - mu[:, :, None, :]) @ R.T / np.sqrt(W - 1)            # [L, H, W, d]
        if G is not None:                                        # into the cached keys' basis
            mu_r = mu_r @ G
            C_r = None if C_r is None else C_r @ G
        z = np.empty((L, Hk, g, T))
        for layer in range(L):   # one layer at a time: [H_kv, g, T, W] stays small at the 7B shape
            K = view.keys[layer]                                             # [Hk, T, d] float32
            m = mu_r[layer].reshape(Hk, g, d).astype(np.float32)
            z[layer] = scale * np.matmul(m, K.transpose(0, 2, 1))            # [Hk, g, T]
            if C_r is not None:
                C = C_r[layer].reshape(Hk, g, W, d).astype(np.float32)
                proj = np.matmul(K[:, None], C.transpose(0, 1, 3, 2))       # [Hk, g, T, W]
                z[layer] += 0.5 * scale * scale * np.square(proj).sum(axis=-1)
        z = z.reshape(L, H, T)
        z -= z.max(axis=-1, keepdims=True)
        a = np.exp(z)
        a /= a.sum(axis=-1, keepdims=True)
        s = a.reshape(L, Hk, g, T).mean(axis=2) + self.epsilon   # [L, Hk, T]
        if self.use_vnorm:
            s = s * np.linalg.norm(view.values, axis=-1)
        if self.n_sink:
            s[..., : self.n_sink] = s.max() + 1.0
        return s
