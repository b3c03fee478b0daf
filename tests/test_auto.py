"""`auto` picks by regime: a query-aware method with a captured window, a query-agnostic one without."""
from __future__ import annotations

import numpy as np

from edgekv.methods import KVView, get_method
from edgekv.methods.auto import QUERY_AGNOSTIC, QUERY_AWARE


def view(with_queries: bool) -> KVView:
    rng = np.random.default_rng(0)
    K = rng.normal(size=(2, 2, 80, 16)).astype(np.float32)
    cand = np.ones(80, bool)
    cand[-8:] = False
    Q = rng.normal(size=(2, 4, 8, 16)).astype(np.float32) if with_queries else None
    return KVView(K, K.copy(), cand, queries=Q)


def test_auto_regimes():
    auto = get_method("auto")
    assert get_method(QUERY_AWARE).needs_queries and not get_method(QUERY_AGNOSTIC).needs_queries
    for with_q, want in ((True, QUERY_AWARE), (False, QUERY_AGNOSTIC)):
        v = view(with_q)
        assert auto.resolve(v).name == want
        plan = auto.plan(v, 20)
        assert plan.info["auto_choice"] == want
        np.testing.assert_array_equal(plan.keep, get_method(want).plan(v, 20).keep)
