"""`snapkv`: SnapKV, per-head importance from the observation window's attention.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469 (defaults as in MixKV's code: window 32, avgpool 5, GQA mean).

score_{l,h}(i) = avgpool_5( mean_{j in window} softmax(q_j K^T * scale)_i ), GQA-averaged over the
query heads that read KV head h. The window tokens themselves are protected by the runtime (they are
the question tail), so only the pooled prefix scores matter here; the window is cut off before pooling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, ScoreMethod, pool1d
from edgekv.methods.registry import register


def snapkv_scores(view: KVView, kernel: int = 5, pooling: str = "avg") -> np.ndarray:
    """[L, H_kv, T] window attention averaged over the window queries, then 1-D pooled over the tokens
    before the window only. The window's attention to itself (large: the diagonal) must not leak into
    the pooled scores of the tokens just before it; kvpress and the MixKV code cut the window off before
    pooling and give the window tokens the maximum score (they are always kept)."""
    attn = view.window_scores / view.window  # [L, H_kv, T] mean over the window
    T, W = attn.shape[-1], view.window
    out = np.empty_like(attn)
    out[..., :T - W] = pool1d(attn[..., :T - W], kernel, pooling)
    out[..., T - W:] = out[..., :T - W].max(axis=-1, keepdims=True) if T > W else 1.0
    return out


@register("snapkv")
@dataclass
class SnapKV(ScoreMethod):
    kernel_size: int = 5
    pooling: str = "avg"

    name = "snapkv"
    paper = "https://arxiv.org/abs/2404.14469"
    needs_queries = True
    reads_values = False  # window attention: every key, no value

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.pooling not in ("avg", "max"):
            raise ValueError("kernel_size >= 1 and pooling in {'avg', 'max'}")

    def score(self, view: KVView) -> np.ndarray:
        return snapkv_scores(view, self.kernel_size, self.pooling)
