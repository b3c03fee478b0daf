"""Decode speed with the full and the compacted cache, next to the memory-bandwidth bound.

Decoding one token reads every weight once and every cached K/V row once, so on a memory-bound CPU the
best speed-up a smaller cache can give is

    bound = (weight bytes + full KV bytes) / (weight bytes + compacted KV bytes).

The model is synthetic with the shapes of a real VLM text model (random weights cost what real ones do).
Prefilling 8k-16k tokens of a 1.5B model on 2 cores takes many minutes, so the long cache is written
directly: a state blob of N cells with random f16 K/V (the codec's layout, llama.cpp's own set_data path),
then a real 32-token question is decoded on top (capturing the observation window) and the method
compacts it exactly as after a real prefill. Prefill speed is measured for real at a shorter length and
reported as measured.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHAPES = {
    # Qwen2-VL-2B's text model (Qwen2-1.5B) shapes; llama arch (1-D RoPE: M-RoPE costs the same per token)
    "qwen2-vl-2b": dict(n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, head_dim=128, n_ff=8960,
                        n_vocab=151936, tie_embeddings=True),
    # Llama 3.2 1B (the text model of several small VLMs); 8 KV heads: a KV-heavier cache per token
    "llama-3.2-1b": dict(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64, n_ff=8192,
                         n_vocab=128256, tie_embeddings=True),
}


def synthetic_model(shape: str = "qwen2-vl-2b", weight_type: str = "q4_0", directory: Path | None = None) -> Path:
    """Build (once, into the edgekv model cache) a random-weight GGUF with a real model's shapes."""
    from edgekv.eval.gemma import models_dir
    from edgekv.testing.tiny import build_text_model

    d = Path(directory) if directory else models_dir()
    path = d / f"synthetic-{shape}-{weight_type}.gguf"
    if not path.exists():
        d.mkdir(parents=True, exist_ok=True)
        build_text_model(path, **SHAPES[shape], arch="llama", weight_type=weight_type, seed=0,
                         n_ctx=32768)
    return path


def weight_bytes(path: Path) -> int:
    """Bytes of all tensors (every one is read per decoded token; tied embeddings: the output matmul)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


@dataclass
class DecodeRow:
    model: str
    context: int
    method: str
    budget: float
    cells: int
    kv_bytes: int
    weight_bytes: int
    ms_per_token: float
    ms_per_token_min: float
    tokens: int
    compact_s: float
    speedup: float = 1.0
    bound: float = 1.0


class _Bench:
    def __init__(self, path: Path, n_ctx: int, threads: int, flash_attn: str, window: int, seed: int):
        from edgekv.runtime import Model

        self.model = Model.load(path, n_ctx=n_ctx, n_batch=512, threads=threads, flash_attn=flash_attn)
        self.window = window
        self.rng = np.random.default_rng(seed)
        lo = 300  # ordinary (non-control, non-byte) ids of the tiny vocabulary
        self.vocab_lo, self.vocab_hi = lo, min(self.model.n_vocab, 400)

    def tokens(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(self.vocab_lo, self.vocab_hi, n)]

    def fill(self, n_cells: int, method: str):
        """A session holding n_cells random compressible cells + a real `window`-token question."""
        from edgekv.kv.codec import KVBlock, LayerKV, SeqState, parse_state, serialize_state
        from edgekv.runtime import Session
        from edgekv.runtime.cache import CacheMarks
        from edgekv.runtime.session import PENDING, SessionSnapshot

        s = Session(self.model, method=method, budget=1.0, window=self.window, auto_compact=False)
        s.append_tokens(self.tokens(8), compressible=True, capture=False)
        tmpl = parse_state(s.state_blob(), has_ext=False, n_blocks=1).blocks[0]
        n = n_cells - self.window
        pool_rows = 4096
        layers = []
        for l in tmpl.layers:
            if l.k_type != 1 or l.v_type != 1:
                raise ValueError("the synthetic fill writes f16 caches only")
            pk = self.rng.standard_normal((pool_rows, l.k.shape[1] // 2), dtype=np.float32).astype(np.float16)
            pv = self.rng.standard_normal((pool_rows, l.v.shape[1] // 2), dtype=np.float32).astype(np.float16)
            idx = self.rng.integers(0, pool_rows, n)
            layers.append(LayerKV(1, pk.view(np.uint8)[idx], 1, pv.view(np.uint8)[idx]))
        block = KVBlock(pos=np.arange(n, dtype=np.int32), seq_id=np.zeros(n, np.int32), ext=None,
                        v_trans=tmpl.v_trans, layers=layers)
        blob = serialize_state(SeqState(0, [block], False))
        del layers, block
        s.restore(SessionSnapshot(blob, CacheMarks(n, np.full(n, PENDING, np.int8), np.full(n, -1, np.int32), n_media=0,
                                                   window_q=None, window_rows=0, logits=None)))
        s.append_tokens(self.tokens(self.window), compressible=False)   # the question: captured window
        return s


    def decode(self, s, n_tokens: int, warmup: int = 2) -> list[float]:
        times = []
        for i in range(warmup + n_tokens):
            tok = int(np.argmax(s.logits))
            t0 = time.perf_counter()
            s.append_tokens([tok], capture=False)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return times

    def close(self):
        self.model.close()


def bench_decode(path: Path, contexts=(8192, 16384), budgets=(0.5, 0.25, 0.1, 0.05), method: str = "snapkv",
                 n_tokens: int = 16, threads: int = 2, flash_attn: str = "auto", window: int = 32, seed: int = 0,
                 log=print) -> list[DecodeRow]:
    """ms/token with the full cache and after `method` at each budget, for every context length."""
    wbytes = weight_bytes(path)
    rows: list[DecodeRow] = []
    name = Path(path).stem
    for ctx in contexts:
        b = _Bench(path, n_ctx=ctx + n_tokens + 16, threads=threads, flash_attn=flash_attn, window=window,
                   seed=seed)
        try:
            t0 = time.perf_counter()
            s = b.fill(ctx, method)
            snap = s.snapshot()
            log(f"[{name}] {ctx} cells written in {time.perf_counter() - t0:.1f} s")
            full_kv, cells = s.kv_bytes(), s.n_cells
            times = b.decode(s, n_tokens)
            full = DecodeRow(name, ctx, "full", 1.0, cells, full_kv, wbytes, 1e3 * statistics.median(times),
                             1e3 * min(times), n_tokens, 0.0)
            rows.append(full)
            log(f"[{name}] {ctx} full: {full.ms_per_token:.1f} ms/token")
            for bud in budgets:
                s.restore(snap)
                r = s.compact(method=method, budget=bud)
                kv, cells = s.kv_bytes(), s.n_cells
                times = b.decode(s, n_tokens)
                row = DecodeRow(name, ctx, method, bud, cells, kv, wbytes, 1e3 * statistics.median(times),
                                1e3 * min(times), n_tokens, r.seconds)
                row.speedup = full.ms_per_token / row.ms_per_token
                row.bound = (wbytes + full_kv) / (wbytes + kv)
                rows.append(row)
                log(f"[{name}] {ctx} {method}@{bud:g}: {row.ms_per_token:.1f} ms/token, x{row.speedup:.2f} "
                    f"(bound x{row.bound:.2f}), compaction {r.seconds:.2f} s")
            s.close()
        finally:
            b.close()
    return rows


def bench_prefill(path: Path, n_tokens: int = 1024, threads: int = 2, flash_attn: str = "auto", seed: int = 0) -> dict:
    """Measured prefill of n_tokens real tokens (n_batch 512), tokens/s."""
    b = _Bench(path, n_ctx=n_tokens + 64, threads=threads, flash_attn=flash_attn, window=32, seed=seed)
    try:
        from edgekv.runtime import Session

        s = Session(b.model, method="full", budget=1.0, auto_compact=False)
        toks = b.tokens(n_tokens)
        t0 = time.perf_counter()
        s.append_tokens(toks, compressible=True)
        dt = time.perf_counter() - t0
        s.close()
        return {"tokens": n_tokens, "seconds": dt, "tokens_per_s": n_tokens / dt}
    finally:
        b.close()


def fit_cost(rows: list[DecodeRow]) -> dict | None:
    """Least-squares ms/token = fixed + per_cell x cells over all rows, and the effective read bandwidth
    of weights (fixed part) and of KV (per-cell part): where the two differ, the byte-ratio bound is off."""
    if len(rows) < 2:
        return None
    cells = np.array([r.cells for r in rows], float)
    ms = np.array([r.ms_per_token for r in rows], float)
    if np.ptp(cells) == 0:
        return None
    per_cell, fixed = np.polyfit(cells, ms, 1)
    kv_per_cell = statistics.median(r.kv_bytes / r.cells for r in rows)
    w = rows[0].weight_bytes
    return {"fixed_ms": float(fixed), "us_per_cell": float(per_cell * 1e3),
            "weights_gb_s": w / (fixed * 1e-3) / 1e9 if fixed > 0 else None,
            "kv_gb_s": kv_per_cell / (per_cell * 1e-3) / 1e9 if per_cell > 0 else None}


def rows_as_dicts(rows: list[DecodeRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def markdown_table(rows: list[DecodeRow], prefill: dict | None = None) -> str:
    out = ["| context | method | budget | cells | KV MiB | ms/token (median) | speed-up | bound | compaction s |"
           + (" compaction % of prefill (est.) |" if prefill else ""),
           "|---|---|---|---|---|---|---|---|---|" + ("---|" if prefill else "")]
    for r in rows:
        line = (f"| {r.context} | {r.method} | {r.budget:g} | {r.cells} | {r.kv_bytes / 2**20:.1f} | "
                f"{r.ms_per_token:.1f} | x{r.speedup:.2f} | x{r.bound:.2f} | "
                f"{r.compact_s:.2f} |" if r.method != "full" else
                f"| {r.context} | full | 1 | {r.cells} | {r.kv_bytes / 2**20:.1f} | {r.ms_per_token:.1f} | x1.00 | "
                f"x1.00 | – |")
        if prefill:
            est = r.context / prefill["tokens_per_s"]
            line += f" {100 * r.compact_s / est:.1f} |" if r.method != "full" else " – |"
        out.append(line)
    return "\n".join(out)
