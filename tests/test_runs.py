"""`hybridkv-runs` / the `Runs` wrapper: known answers for the run expansion."""
from __future__ import annotations

import numpy as np

from edgekv.methods import KVView, Span, get_method
from edgekv.methods.runs import Runs, expand_runs


def test_expand_runs_known_answer():
    """Seeds in order, each widened centre out; off-range and protected tokens skipped; C kept."""
    cand = np.ones(20, bool)
    cand[15] = False                                       # protected: never a neighbour
    keep = np.array([[[10, 3, 17, 0, 19, 1]]])
    np.testing.assert_array_equal(expand_runs(keep, cand, 1), [[[10, 9, 11, 3, 2, 4]]])
    np.testing.assert_array_equal(expand_runs(keep, cand, 0), keep)
    # runs that touch merge, and a seed at the edge keeps only its in-range side
    keep = np.array([[[0, 2, 16, 8, 12, 5]]])
    np.testing.assert_array_equal(expand_runs(keep, cand, 1), [[[0, 1, 2, 3, 16, 17]]])


def test_knorm_runs_keeps_the_whole_run_around_its_best_token():
    """Plain knorm keeps the 5 smallest keys, spread over the span; wrapped with radius 2 it keeps the
    5-token run centred on the smallest one (the fact's neighbours), in the same 5 cells."""
    T, d = 40, 8
    keys = np.ones((1, 1, T, d), np.float32)
    for t, scale in [(20, 0.1), (3, 0.2), (30, 0.3), (11, 0.4), (36, 0.5)]:
        keys[0, 0, t] *= scale
    view = KVView(keys, keys.copy(), np.ones(T, bool), spans=(Span(0, T, "media", 0),))
    plain = get_method("knorm").plan(view, 5)
    assert set(plain.keep[0, 0].tolist()) == {20, 3, 30, 11, 36}
    runs = Runs(inner="knorm", radius=2).plan(view, 5)
    assert runs.keep[0, 0].tolist() == [20, 19, 21, 18, 22]
    np.testing.assert_array_equal(runs.nominal, plain.nominal)
    assert runs.info["method"] == "knorm-runs" and runs.info["radius"] == 2


def test_hybridkv_runs_is_registered_and_query_aware():
    m = get_method("hybridkv-runs")
    assert m.needs_queries and m.inner == "hybridkv" and m.radius == 2
    assert get_method("hybridkv-runs", radius=1).radius == 1
