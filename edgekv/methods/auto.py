"""`auto` (the default): pick a method by regime.

- A captured question window (the question follows the media): the best query-aware method.
- No window (question not known yet, flash-attention callers without capture, multi-turn prefetch):
  the best query-agnostic method.

Which methods these are comes from the measurements in results/ (`edgekv eval`, Gemma 3 270M, see the
README): edit QUERY_AWARE / QUERY_AGNOSTIC when new numbers say otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgekv.methods.base import KVView, Method, Plan
from edgekv.methods.registry import get_method, register

QUERY_AWARE = "snapkv"
QUERY_AGNOSTIC = "flashcache"


@register("auto")
@dataclass
class Auto(Method):
    """Picks a query-aware method when a question window was captured, a query-agnostic one otherwise."""

    query_aware: str = QUERY_AWARE
    query_agnostic: str = QUERY_AGNOSTIC

    name = "auto"
    paper = ""

    def resolve(self, view: KVView) -> Method:
        return get_method(self.query_aware if view.queries is not None else self.query_agnostic)

    def plan(self, view: KVView, budget: int) -> Plan:
        m = self.resolve(view)
        plan = m.plan(view, budget)
        plan.info["auto_choice"] = m.name
        return plan
