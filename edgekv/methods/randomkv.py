"""`random`: keep a uniformly random subset of the candidates (the floor every method must beat).

As kvpress's RandomPress: score_{l,h}(i) ~ U(0, 1), independently for every (layer, KV head, token).
The generator is seeded by (view.seed, self.seed), so a plan is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.methods.base import KVView, ScoreMethod
from edgekv.methods.registry import register


@register("random")
@dataclass
class Random(ScoreMethod):
    seed: int = 0  # combined with view.seed

    name = "random"
    paper = "https://github.com/NVIDIA/kvpress/blob/main/kvpress/presses/random_press.py"
    reads_keys = reads_values = False  # but all cells: the draws are shaped [L, H_kv, T]

    def score(self, view: KVView) -> np.ndarray:
        rng = np.random.default_rng([view.seed, self.seed])
        return rng.random((view.n_layers, view.n_kv_heads, view.n_tokens), dtype=np.float32)
