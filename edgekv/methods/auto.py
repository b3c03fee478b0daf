"""`auto` (the default): pick a method by regime.

- A captured question window (the question follows the media): the best query-aware method.
- Compaction before the question with a probe window (runtime/probe.py; automatic when query capture is
  on): the question known in advance as the probe (PROBE_KNOWN), or a generic probe (PROBE_GENERIC).
- No window at all (query capture off, probe=False): the best query-agnostic method.

Media path, compress before the question (results/eval-media: `edgekv eval --media --regime all`, Gemma 3
270M reading the document as text-in-pixels images, 48 needle samples per cell: passkey, kv, word, pair x
1k/2k x 3 depths x 2 filler sources; accuracy relative to the full cache at budget 0.25 / 0.1, 95 % Wilson
interval of the accuracy in brackets):
- question known in advance (probe = the question): hybridkv 0.93 / 0.85 ([0.66, 0.88] / [0.59, 0.83]),
  the same as with the question after the media (0.93 / 0.83); expected 0.59 / 0.37;
- question not known (generic probe): hybridkv 0.63 / 0.41 ([0.40, 0.67] / [0.23, 0.50]); expected 0.27 / 0.24;
- no probe: keydiff 0.44 / 0.02 ([0.25, 0.52] / [0.00, 0.11]), streaming 0.39 / 0.07, knorm 0.24 / 0.02.
  knorm, chosen earlier from 12 text samples (0.92 passkey at 0.25), does not hold up on the media path.
So the probe regimes pick hybridkv, and the no-window pick is keydiff (ahead of knorm at 0.25 with barely
overlapping intervals; at 0.1 nothing without a probe keeps the needle).

Question after the media (results/gemma-270m, text path, 12 samples per cell; confirmed on the media path
above): `hybridkv` had the best passkey accuracy (1.00 / 0.92 / 0.58 at 0.25 / 0.1 / 0.05) and the lowest
continuation KL (0.08 / 0.27 at 0.25 / 0.1), ahead of `mixkv` (1.00 / 0.83 / 0.33). One 270M text model
with one KV head and media tokens that are text tokens: edit the names below when image models say otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgekv.methods.base import KVView, Method, Plan
from edgekv.methods.registry import get_method, register

QUERY_AWARE = "hybridkv"
QUERY_AGNOSTIC = "keydiff"
# Compaction before the question with a probe window (runtime/probe.py): the question known in advance,
# or a generic probe (numbers above).
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
