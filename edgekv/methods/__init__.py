"""Compression methods (pure numpy). Importing this package registers every method by name."""
from __future__ import annotations

from edgekv.methods.base import KVView, Method, Plan, ScoreMethod, Span, parse_budget, resolve_budget
from edgekv.methods.registry import METHODS, get_method, register, uses_queries

# Each import registers its methods.
from edgekv.methods import (  # noqa: E402,F401
    adakv, expected, flashcache, flowmm, full, hybridkv, keydiff, knorm, mixkv, pyramidkv, randomkv, snapkv, streaming,
    vnorm,
)

__all__ = ["KVView", "Method", "Plan", "ScoreMethod", "Span", "METHODS", "get_method", "register",
           "parse_budget", "resolve_budget", "uses_queries"]

from edgekv.methods import auto  # noqa: E402,F401  (after the others: it names them)
from edgekv.methods import runs  # noqa: E402,F401  (`hybridkv-runs`: wraps a registered method)
