"""Compression methods (pure numpy). Importing this package registers every method by name."""
from __future__ import annotations

from edgekv.methods.base import KVView, Method, Plan, ScoreMethod, Span, parse_budget, resolve_budget
from edgekv.methods.registry import METHODS, get_method, register

# Each import registers its methods.
from edgekv.methods import full, snapkv, streaming  # noqa: E402,F401

__all__ = ["KVView", "Method", "Plan", "ScoreMethod", "Span", "METHODS", "get_method", "register",
           "parse_budget", "resolve_budget"]
