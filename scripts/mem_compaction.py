#!/usr/bin/env python
"""Where one streamed compaction's transient host memory goes.

    OMP_WAIT_POLICY=PASSIVE python scripts/mem_compaction.py [--cells 4000] [--chunk 256] [--steps 3]

A synthetic SmolVLM-256M-shaped model (the one `bench_video.py` builds: 30 layers, 3 KV heads, f16 KV,
flash attention off, so V is stored transposed) gets a cache of `--cells` cells written straight into
llama.cpp with `llama_state_seq_set_data` (random f16 K/V, no prefill): the last `--chunk` cells are a
new frame (pending media), the others earlier frames' packed slots, as between two frames of a video.
Each step compacts the frame with `auto` (its query-agnostic pick, `keydiff` now; no probe: query capture is off) at 0.2 and reports: tracemalloc's
peak of Python/numpy allocations above the level before the call, the process RSS high-water mark above
RSS before the call (VmHWM after resetting it through /proc/self/clear_refs), both in units of the KV
bytes the sequence held (X), and the compaction's seconds. Also a hash of the packed blob, so two trees
can be compared for identical output. --chunk-only: the same frame compacted alone (the LastChunk region).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> int:
    import numpy as np

    from edgekv.kv.codec import KVBlock, LayerKV, SeqState, parse_state, serialize_state
    from edgekv.runtime import Model, Session
    from edgekv.runtime.cache import PACKED, PENDING, PROTECTED
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_video import build_models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--chunk-only", action="store_true",
                    help="Mark the last --chunk cells as the media chunk just decoded, so the compaction takes "
                         "the LastChunk region (reads and rewrites that chunk alone).")
    a = ap.parse_args()

    text, mm = build_models("smolvlm-256m", "q4_0")
    m = Model.load(text, None, n_ctx=a.cells + 64, n_batch=512, threads=2, flash_attn="off",
                   capture_queries=False)
    s = Session(m, method=a.method, budget=a.ratio, auto_compact=False)
    s.append_text("hello")                           # a real blob: its header and layer types
    tmpl = parse_state(bytes(s.state_blob()), has_ext=m.layout.mrope).blocks[0]
    rng = np.random.default_rng(0)
    n = a.cells
    layers = []
    for l in tmpl.layers:
        k = rng.standard_normal((n, l.k.shape[1] // 2)).astype(np.float16).view(np.uint8)
        v = rng.standard_normal((n, l.v.shape[1] // 2)).astype(np.float16).view(np.uint8)
        layers.append(LayerKV(l.k_type, k, l.v_type, v))
    block = KVBlock(pos=np.arange(n, dtype=np.int32), seq_id=np.zeros(n, np.int32), ext=None,
                    v_trans=tmpl.v_trans, layers=layers)
    blob = serialize_state(SeqState(0, [block], False))
    x = block.nbytes
    del layers, block
    print(f"{n} cells, X = KV bytes held = {x / 2**20:.1f} MiB, v_trans={tmpl.v_trans}")
    print("step | tracemalloc peak | RSS high-water above before | seconds | blob sha1")
    for step in range(a.steps):
        c = s.cache
        c.reset()
        if not c.set_state(blob):
            raise SystemExit("llama.cpp refused the synthetic state")
        c.n_past = n
        kind = np.full(n, PACKED, np.int8)
        if a.chunk_only:   # the chunk's last cell is the pos_max cell (kept whole by the LastChunk region)
            kind[n - a.chunk:] = PENDING
        else:
            kind[n - a.chunk - 1:n - 1] = PENDING
            kind[-1] = PROTECTED
        media = np.full(n, -1, np.int32)
        media[:n - 1] = 0
        c.kind, c.media, c.n_media = kind, media, 1
        if a.chunk_only:
            c.note_chunk(n - a.chunk, n, a.chunk)
        tracemalloc.start()
        base_py = tracemalloc.get_traced_memory()[0]
        rss0 = status_kb("VmRSS")
        ok = reset_hwm()
        t0 = time.perf_counter()
        r = s.compact(early=True)
        dt = time.perf_counter() - t0
        hwm = status_kb("VmHWM")
        peak_py = tracemalloc.get_traced_memory()[1] - base_py
        tracemalloc.stop()
        digest = hashlib.sha1(bytes(s.state_blob())).hexdigest()[:12]
        print(f"{step} | {peak_py / 2**20:.1f} MiB ({peak_py / x:.2f} X) | "
              + (f"{(hwm - rss0) / 1024:.1f} MiB ({(hwm - rss0) * 1024 / x:.2f} X)" if ok else "n/a")
              + f" | {dt:.2f} | {digest}  ({r.method}, {r.cells_before} -> {r.cells_after} cells)")
    s.close()
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
