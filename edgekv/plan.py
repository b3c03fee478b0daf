"""The plan type: what a method hands the packer. Its own module so the kv layer (the packer) and the
methods layer both see it without the kv layer importing the methods."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class ViewShape(Protocol):
    """What validating a plan reads of the view it was made on (`edgekv.methods.KVView` has it)."""

    n_layers: int
    n_kv_heads: int
    n_tokens: int
    candidates: np.ndarray


@dataclass
class Plan:
    """What to keep: per (layer, KV head) a row of C token indices, plus optional merges.

    keep:         [L, H_kv, C] int64 indices into the view's tokens, all candidates, unique per row.
                  C is the number of cells the compressed span will occupy (the largest per-head
                  budget); a head whose own budget is smaller fills its spare slots with its next-best
                  tokens (never worse than its own budget).
    nominal:      [L, H_kv] the method's own per-(layer, head) budgets (<= C).
    merge_to:     optional [L, H_kv, T] int64: the slot (0..C-1, an index into keep's last axis) that
                  evicted token t is averaged into, -1 for tokens not merged (kept or dropped).
    merge_weight: optional [L, H_kv, T] float32 weight of every token in its slot's weighted mean; the
                  kept token of a slot contributes with its own weight.
    info:         free-form notes for the report (allocator, layer strategies, ...).
    """

    keep: np.ndarray
    nominal: np.ndarray
    merge_to: np.ndarray | None = None
    merge_weight: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_slots(self) -> int:
        return self.keep.shape[-1]

    def capped(self, slots: int) -> "Plan":
        """At most `slots` cells: each row keeps its first (best) `slots` tokens. For a context sized for the
        budget (streamed media): per-head budgets above the mean (hybridkv, adakv, ...) would otherwise make
        the cells kept, the largest head budget, outgrow it. Plans that merge are returned as they are."""
        if self.n_slots <= slots or self.merge_to is not None:
            return self
        return Plan(keep=self.keep[..., :slots], nominal=np.minimum(self.nominal, slots),
                    info={**self.info, "capped_from": self.n_slots})

    def validate(self, view: ViewShape) -> "Plan":
        L, Hk, T = view.n_layers, view.n_kv_heads, view.n_tokens
        if self.keep.ndim != 3 or self.keep.shape[:2] != (L, Hk):
            raise ValueError(f"plan.keep must be [L={L}, H_kv={Hk}, C], got {self.keep.shape}")
        if self.nominal.shape != (L, Hk):
            raise ValueError(f"plan.nominal must be [{L}, {Hk}], got {self.nominal.shape}")
        if self.keep.size:
            if self.keep.min() < 0 or self.keep.max() >= T:
                raise ValueError("plan.keep indexes outside the view")
            if not view.candidates[self.keep].all():
                raise ValueError("plan.keep selects a protected (non-candidate) token")
            srt = np.sort(self.keep, axis=-1)
            if (np.diff(srt, axis=-1) == 0).any():
                raise ValueError("plan.keep has a duplicated token in a row")
        if (self.nominal > self.n_slots).any():
            raise ValueError("a nominal budget exceeds the slots used")
        if (self.merge_to is None) != (self.merge_weight is None):
            raise ValueError("merge_to and merge_weight come together")
        if self.merge_to is not None:
            if self.merge_to.shape != (L, Hk, T) or self.merge_weight.shape != (L, Hk, T):
                raise ValueError("merge arrays must be [L, H_kv, T]")
            if self.merge_to.max(initial=-1) >= self.n_slots or self.merge_to.min(initial=-1) < -1:
                raise ValueError("merge_to names a slot that does not exist")
        return self
