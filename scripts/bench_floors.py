"""The numpy floors under the planning times (one thread, BLAS pinned to one thread), at the 7B shape of
bench_planning.py: what docs/results.md, "Planning time", quotes as the cost of the pieces no tuning removes.

    python scripts/bench_floors.py

- float32 exp, ns per element (the window softmax's 206 M exponentials);
- the window GEMM of one (layer, KV head): [7 heads x 32 queries, 128] x [128, 8224];
- FlowMM's matching of one head: 7373 evicted tokens against 737 open pivots, exact (d = 128) and with
  the keys cut to 16 / 32 dimensions, and the argmax over the score matrix alone;
- FlashCache's transforms of one layer's K or V: the transposed copy, the DCT and the inverse DCT.
"""
from __future__ import annotations

import time

import numpy as np
import scipy.fft
from threadpoolctl import threadpool_limits

from edgekv.methods.flashcache import high_pass_residual


def ms(fn, repeats: int = 10) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    rng = np.random.default_rng(0)
    with threadpool_limits(1, user_api="blas"):
        x = rng.uniform(-20, 0, 1 << 20).astype(np.float32)
        out = np.empty_like(x)
        print(f"float32 exp: {1e6 * ms(lambda: np.exp(x, out=out)) / x.size:.2f} ns/element "
              f"(add: {1e6 * ms(lambda: np.add(x, x, out=out)) / x.size:.2f} ns/element)")

        q = rng.standard_normal((224, 128), dtype=np.float32)
        k = rng.standard_normal((8224, 128), dtype=np.float32)
        t = ms(lambda: q @ k.T)
        print(f"window GEMM, one (layer, KV head): {t:.1f} ms, {2 * q.size * k.shape[0] / t / 1e6:.0f} GFLOPS")

        tokens = rng.standard_normal((7373, 128), dtype=np.float32)
        pivots = rng.standard_normal((737, 128), dtype=np.float32)
        pivots /= np.linalg.norm(pivots, axis=1, keepdims=True)
        pt = np.ascontiguousarray(pivots.T)
        t = ms(lambda: np.argmax(tokens @ pt, axis=1))
        print(f"FlowMM matching, one head, exact (d=128): {t:.1f} ms, {2 * tokens.size * 737 / t / 1e6:.0f} GFLOPS")
        for r in (16, 32):
            tr, pr = np.ascontiguousarray(tokens[:, :r]), np.ascontiguousarray(pt[:r])
            print(f"FlowMM matching, one head, keys cut to {r} dims: {ms(lambda: np.argmax(tr @ pr, axis=1)):.1f} ms")
        scores = tokens @ pt
        print(f"argmax over the {scores.size / 1e6:.1f} M scores alone: {ms(lambda: scores.argmax(axis=1)):.1f} ms")

        layer = rng.standard_normal((4, 8192, 128), dtype=np.float32)
        buf = np.empty((4, 128, 8192), dtype=np.float32)
        t = ms(lambda: high_pass_residual(layer, 0.15, out=buf))
        print(f"FlashCache, one layer's K: transposed copy + DCT + IDCT {t:.1f} ms "
              f"(DCT alone {ms(lambda: scipy.fft.dct(buf, type=2, axis=2)):.1f} ms)")


if __name__ == "__main__":
    main()
