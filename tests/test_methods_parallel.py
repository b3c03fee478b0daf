"""Planning on threads: same plans at any thread count, reductions equal to the full attention,
nested fan-outs that run inline, and the FlashCache residual under its unnormalised transforms."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import scipy.fft

from edgekv.methods import METHODS, KVView, Span, get_method
from edgekv.methods.flashcache import high_pass_residual
from edgekv.methods.parallel import parallel_map, threads

from test_methods import SHAPES, make_view, plan_arrays


def fresh(view: KVView) -> KVView:
    return KVView(view.keys, view.values, view.candidates, spans=view.spans, queries=view.queries,
                  seed=view.seed)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_plans_do_not_depend_on_the_thread_count(name, monkeypatch):
    view = make_view(*SHAPES["gqa-two-images"][:7], zero_tokens=SHAPES["gqa-two-images"][7])
    plans = []
    for n in ("1", "3"):
        monkeypatch.setenv("EDGEKV_THREADS", n)
        assert threads() == int(n)
        plans.append(get_method(name).plan(fresh(view), 9))
    for a, b in zip(*map(plan_arrays, plans)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", ["text-between-media", "one-candidate"])  # text / media the smaller part
def test_window_reductions_equal_the_reduced_window_attention(shape, monkeypatch):
    monkeypatch.setenv("EDGEKV_THREADS", "2")
    view = make_view(*SHAPES[shape][:7])
    full = fresh(view).window_attention                                    # [L, H, W, T]
    np.testing.assert_allclose(view.window_scores, full.sum(axis=2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(view.window_media_mass, full @ view.media_mask.astype(np.float32),
                               rtol=1e-5, atol=1e-7)
    # every window row is a distribution: its media mass is in [0, 1] and the column sums add to W
    assert (view.window_media_mass >= 0).all() and (view.window_media_mass <= 1 + 1e-6).all()
    np.testing.assert_allclose(view.window_scores.sum(axis=-1), view.window, rtol=1e-5)


def test_window_media_mass_on_a_known_split():
    """Keys 0..3 are media, 4..7 text; every query attends uniformly (zero queries): a text query j
    at position 4+j sees 4 media keys of its 5+j keys."""
    L, Hk, H, T, d, W = 1, 1, 2, 8, 4, 4
    keys = np.ones((L, Hk, T, d), dtype=np.float32)
    view = KVView(keys, keys.copy(), np.arange(T) < 4, spans=(Span(0, 4, "media", 0), Span(4, 8, "text")),
                  queries=np.zeros((L, H, W, d), dtype=np.float32))
    np.testing.assert_allclose(view.window_media_mass[0, 0], 4 / (5 + np.arange(W)), rtol=1e-6)


def test_parallel_map_keeps_order_and_runs_nested_calls_inline(monkeypatch):
    monkeypatch.setenv("EDGEKV_THREADS", "2")
    seen: set[str] = set()

    def inner(i: int, _: None) -> int:
        seen.add(threading.current_thread().name)
        return i * i

    def outer(i: int, buf: np.ndarray) -> int:
        assert buf.shape == (3, 5) and buf.dtype == np.float32
        return sum(parallel_map(inner, range(i)))  # would deadlock if it waited on the busy pool

    assert parallel_map(outer, range(10), scratch=(3, 5)) == [sum(j * j for j in range(i)) for i in range(10)]
    assert all(name.startswith("edgekv-plan") for name in seen)


def test_high_pass_residual_equals_the_ortho_low_pass_residual():
    """Unnormalised forward/inverse DCTs on the transposed copy give the residual of the
    orthonormal low-pass projection the paper describes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50, 6)).astype(np.float32)
    x[:, 20] += 9.0                                                   # an outlier token
    c = scipy.fft.dct(x.astype(np.float64), type=2, axis=1, norm="ortho")
    c[:, : int(np.floor(0.15 * 50)) + 1] = 0.0
    ref = scipy.fft.idct(c, type=2, axis=1, norm="ortho")              # [H, n, d]
    res = high_pass_residual(x, 0.15)                                  # [H, d, n]
    np.testing.assert_allclose(res.transpose(0, 2, 1), ref, rtol=1e-4, atol=1e-4)
    assert np.argmax((res ** 2).sum(axis=(0, 1))) == 20


def test_planning_threads_scope_and_the_env_override(monkeypatch):
    from edgekv.methods.parallel import planning_threads

    monkeypatch.delenv("EDGEKV_THREADS", raising=False)
    with planning_threads(3):
        assert threads() == 3
        monkeypatch.setenv("EDGEKV_THREADS", "1")  # an explicit override wins
        assert threads() == 1
        monkeypatch.delenv("EDGEKV_THREADS")
    assert threads() == (os.cpu_count() or 1)


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_a_clear_error(bad, monkeypatch):
    from edgekv.errors import EdgeKVError

    monkeypatch.setenv("EDGEKV_THREADS", bad)
    with pytest.raises(EdgeKVError, match="EDGEKV_THREADS must be a positive integer"):
        threads()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_plans_on_its_own_threads(monkeypatch):
    """The pool's threads do not survive fork: the child must start its own, not wait forever."""
    monkeypatch.setenv("EDGEKV_THREADS", "2")
    assert parallel_map(lambda i, _: i + 1, range(4)) == [1, 2, 3, 4]   # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if planning works, and never return into pytest
        ok = False
        try:
            ok = parallel_map(lambda i, _: i * 2, range(6)) == [0, 2, 4, 6, 8, 10]
        finally:
            os._exit(0 if ok else 1)
    for _ in range(200):  # 20 s
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child deadlocked on the parent's planning pool")
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_readme_custom_method_example_plans():
    """docs/methods.md's 'A method of your own' snippet, verbatim, registers and plans."""
    import re
    from pathlib import Path

    from edgekv.methods import registry

    text = Path(__file__).resolve().parent.parent.joinpath("docs", "methods.md").read_text()
    code = re.search(r"```python\n(from dataclasses import dataclass\n.*?)```", text, re.S).group(1)
    try:
        exec(compile(code, "docs/methods.md", "exec"), {})
        view = make_view(*SHAPES["gqa-two-images"][:7])
        plan = get_method("window-sum").plan(view, 5)
        assert plan.keep.shape[-1] == 5
        best = np.where(view.candidates, view.window_scores, -np.inf).argmax(axis=-1)
        np.testing.assert_array_equal(plan.keep[..., 0], best)
    finally:
        registry.METHODS.pop("window-sum", None)


def test_the_planning_benchmark_runs_and_names_what_misses_the_target():
    """scripts/bench_planning.py on a small shape: every method gets a row, and a target no plan can
    meet lists them all (the verdict line docs/results.md quotes)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_planning.py"
    out = subprocess.run([sys.executable, str(script), "--layers", "2", "--media", "256", "--repeats", "1",
                          "--target", "0"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EDGEKV_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    for name in METHODS:
        assert f"| {name} | 26 |" in out.stdout
    verdict = out.stdout.strip().splitlines()[-1]
    assert verdict.startswith("at or over the 0 s target") and all(f"{n} @ 26" in verdict for n in METHODS)


def test_the_floors_benchmark_prints_every_floor_the_readme_quotes():
    """scripts/bench_floors.py (2 s): one line per floor, each with a positive measurement."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_floors.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    for start in ("float32 exp:", "window GEMM", "FlowMM matching, one head, exact", "keys cut to 16 dims",
                  "keys cut to 32 dims", "argmax over", "FlashCache, one layer"):
        line = next(ln for ln in lines if start in ln)
        assert float(re.search(r"(\d+\.\d+) (ms|ns)", line).group(1)) > 0, line


def test_concurrent_planners_leave_blas_threads_as_they_found_them(monkeypatch):
    """Two sessions planning at once from their own threads: both get results, and afterwards BLAS
    runs with its original thread count (interleaved threadpool_limits would leave it at 1)."""
    from threadpoolctl import threadpool_info

    monkeypatch.setenv("EDGEKV_THREADS", "2")

    def blas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    gate = threading.Barrier(2)
    results: dict[int, list[int]] = {}

    def planner(k: int) -> None:
        def slow(i: int, _: None) -> int:
            time.sleep(0.01)
            return i * k
        gate.wait()
        for _ in range(5):
            results[k] = parallel_map(slow, range(6))

    threads_ = [threading.Thread(target=planner, args=(k,)) for k in (1, 2)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join(30)
    assert results == {1: [0, 1, 2, 3, 4, 5], 2: [0, 2, 4, 6, 8, 10]}
    assert blas_threads() == before
