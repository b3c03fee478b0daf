"""`auto` (the default): pick a method by regime.

- A captured question window (the question follows the media): the best query-aware method.
- No window (question not known yet, flash-attention callers without capture, multi-turn prefetch):
  the best query-agnostic method.

Which methods these are comes from the measurements in results/gemma-270m (`edgekv eval`, Gemma 3 270M,
real text, 1k-8k tokens, budgets 0.5-0.05; see the README). At budgets <= 0.25, among methods whose cells
stay at the budget (the pyramid allocators pack ~2x the cells):
- query-aware: `hybridkv` had the best passkey accuracy (1.00 / 0.92 / 0.58 at 0.25 / 0.1 / 0.05) and the
  lowest continuation KL (0.08 / 0.27 at 0.25 / 0.1), ahead of `mixkv` (1.00 / 0.83 / 0.33);
- query-agnostic: `knorm` kept the pass key best (0.92 at 0.25, others <= 0.33); `flashcache` led only on
  key-value lookup at 0.25-0.5.
Twelve samples per cell on one text model, so this is a weak signal: edit QUERY_AWARE / QUERY_AGNOSTIC
when new numbers (image models especially) say otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgekv.methods.base import KVView, Method, Plan
from edgekv.methods.registry import get_method, register

QUERY_AWARE = "hybridkv"
QUERY_AGNOSTIC = "knorm"
# Compaction before the question with a probe window (runtime/probe.py): the question known in advance,
# or a generic probe. Chosen from the media-path grid (see the numbers above).
PROBE_KNOWN = "hybridkv"
PROBE_GENERIC = "hybridkv"


@register("auto")
@dataclass
class Auto(Method):
    """Picks a query-aware method when a question window was captured, a query-agnostic one otherwise."""

    query_aware: str = QUERY_AWARE
    query_agnostic: str = QUERY_AGNOSTIC
    probe_known: str = PROBE_KNOWN
    probe_generic: str = PROBE_GENERIC

    name = "auto"
    paper = ""

    def resolve(self, view: KVView) -> Method:
        return get_method(self.query_aware if view.queries is not None else self.query_agnostic)

    def for_probe(self, known: bool) -> Method:
        """The pick when the window is a probe: the user's question known in advance, or generic."""
        return get_method(self.probe_known if known else self.probe_generic)

    def plan(self, view: KVView, budget: int) -> Plan:
        m = self.resolve(view)
        plan = m.plan(view, budget)
        plan.info["auto_choice"] = m.name
        return plan
