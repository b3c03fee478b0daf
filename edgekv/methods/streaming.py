"""`streaming`: StreamingLLM, attention sinks + the most recent tokens.

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453

score(i) = 1 for the first `n_sink` candidates and the last (budget - n_sink) candidates, 0 otherwise.
Applied to the candidate span (the image), in token order. Query-agnostic; same for every head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, Plan, ScoreMethod, check_budget, top_k
from edgekv.methods.registry import register


@register("streaming")
@dataclass
class StreamingLLM(ScoreMethod):
    n_sink: int = 4  # the paper's 4 initial tokens

    name = "streaming"
    paper = "https://arxiv.org/abs/2309.17453"
    view_cells = "candidates"  # the candidates' order alone
    reads_keys = reads_values = False

    def __post_init__(self) -> None:
        if self.n_sink < 0:
            raise ValueError("n_sink must be >= 0")

    def score(self, view: KVView) -> np.ndarray:
        raise NotImplementedError("streaming ranks by budget; see plan()")

    def plan(self, view: KVView, budget: int) -> Plan:
        budget = check_budget(budget, view.n_candidates)
        cand = np.flatnonzero(view.candidates)
        n_sink = min(self.n_sink, budget)
        keep_idx = np.concatenate([cand[:n_sink], cand[len(cand) - (budget - n_sink):]])
        s = np.zeros(view.n_tokens)
        s[keep_idx] = 1.0
        s[cand[:n_sink]] = 2.0  # sinks first, then recent: a stable, readable order
        L, H = view.n_layers, view.n_kv_heads
        keep = top_k(np.broadcast_to(s, (L, H, view.n_tokens)), view.candidates, budget)
        return Plan(keep=keep, nominal=np.full((L, H), budget, np.int64),
                    info={"method": self.name}).validate(view)
