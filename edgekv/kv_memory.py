"""One memory knob: `--kv-memory R` picks the KV cache type and the compaction budget from a measured front.

A cache type is written `q8_0` (K and V alike) or `q8_0/q4_0` (K type / V type). The table
(edgekv/data/kv_memory.json, written by scripts/kv_memory_table.py from an `edgekv eval --cache-types`
runs, one per document length) lists measured points: cache types, budget, the sliding-window block's share
(Gemma 3; 1 where absent), bytes as a fraction of the full f16 cache (the largest over the lengths measured),
and the score relative to the full f16 cache (every length's samples pooled; `worst`: the lowest of any one
length). `pick(ratio)` takes the best-scoring point whose bytes fit the ratio.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from edgekv.errors import EdgeKVError

CACHE_TYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")   # llama.cpp's -ctk/-ctv that edgekv loads
UNQUANTIZED = ("f16", "bf16", "f32")
TABLE = Path(__file__).parent / "data" / "kv_memory.json"
TABLE_ENV = "EDGEKV_KV_MEMORY_TABLE"   # another table (your own model's front, from scripts/kv_memory_table.py)


class KVMemoryError(EdgeKVError):
    """A --kv-memory value that cannot be parsed, or that no measured combination reaches."""


def parse_cache_type(label: str) -> tuple[str, str]:
    """'q8_0' -> ('q8_0', 'q8_0'); 'q8_0/q4_0' -> ('q8_0', 'q4_0') (K / V)."""
    parts = [p.strip().lower() for p in str(label).split("/")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or any(p not in CACHE_TYPES for p in parts):
        raise EdgeKVError(f"cache type {label!r}: write a type ({', '.join(CACHE_TYPES)}) for K and V, or "
                          f"K/V such as q8_0/q4_0")
    return parts[0], parts[1]


def cache_label(type_k: str, type_v: str) -> str:
    """('q8_0', 'q8_0') -> 'q8_0'; ('q8_0', 'q4_0') -> 'q8_0/q4_0'."""
    return type_k if type_k == type_v else f"{type_k}/{type_v}"


def needs_flash_attn(type_v: str) -> bool:
    """llama.cpp stores a quantized V cache only with flash attention (it transposes V otherwise)."""
    return type_v not in UNQUANTIZED


# --- the knob ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryTarget:
    """--kv-memory as given: a ratio of the full f16 cache, or an absolute size in bytes."""

    ratio: float | None = None
    nbytes: int | None = None
    text: str = ""

    def resolve(self, full_f16_bytes: int) -> float:
        """The ratio of a cache whose full f16 size is `full_f16_bytes`."""
        if self.ratio is not None:
            return self.ratio
        return self.nbytes / full_f16_bytes


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}


def parse_kv_memory(value: str) -> MemoryTarget:
    """'0.25' or '25%' -> ratio; '300MB', '1.5GiB' -> bytes."""
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)", text)
    if not m:
        raise KVMemoryError(f"--kv-memory takes a ratio of the full f16 cache (0.25, 25%) or a size (300MB), "
                            f"got {value!r}")
    num, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        num, unit = num / 100, ""
    if unit == "" and num <= 1:
        if num <= 0:
            raise KVMemoryError(f"--kv-memory must be above 0, got {value!r}")
        return MemoryTarget(ratio=num, text=text)
    if unit not in _UNITS or (unit == "" and num > 1):
        raise KVMemoryError(f"--kv-memory {value!r}: a ratio lies in (0, 1]; a size needs a unit "
                            f"(KB, MB, GB, KiB, MiB, GiB)")
    return MemoryTarget(nbytes=int(num * _UNITS[unit]), text=text)


@dataclass(frozen=True)
class Pick:
    """What --kv-memory chose: cache types, the budget (1.0 = no eviction), and the measured point."""

    cache_type_k: str
    cache_type_v: str
    budget: float
    ratio: float          # measured KV bytes / full f16 cache bytes of this point
    score: float          # measured score relative to the full f16 cache
    target: float         # the ratio asked for
    swa_budget: float = 1.0   # sliding-window models: the window block's share (Session(swa_budget=))
    worst: float | None = None   # the lowest relative score at any one length measured
    lengths: tuple[int, ...] = ()   # the document lengths (tokens) the point was measured at

    @property
    def cache_type(self) -> str:
        return cache_label(self.cache_type_k, self.cache_type_v)

    def describe(self, asked: str = "") -> str:
        b = "no eviction" if self.budget >= 1 else f"budget {self.budget:g}"
        if self.swa_budget < 1:
            b += f", sliding-window block {self.swa_budget:g}"
        asked = f"{asked} = " if asked and asked != f"{self.target:g}" else ""
        over = ""
        if self.worst is not None and len(self.lengths) > 1:
            over = f", {self.worst:.2f} at worst over {min(self.lengths)}-{max(self.lengths)} tokens"
        return (f"--kv-memory {asked}{self.target:.3g} of the f16 cache: {self.cache_type} cache, {b} (measured "
                f"{self.ratio:.2f} of the f16 cache's bytes, {self.score:.2f} of its score{over})")

    def __iter__(self):   # (cache_type_k, cache_type_v, budget), as the helper returns
        return iter((self.cache_type_k, self.cache_type_v, self.budget))


def load_table(path: str | None = None) -> dict:
    """The table at `path`, $EDGEKV_KV_MEMORY_TABLE, or the package's."""
    return _read_table(str(path or os.environ.get(TABLE_ENV) or TABLE))


@lru_cache(maxsize=4)
def _read_table(path: str) -> dict:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KVMemoryError(f"cannot read the --kv-memory table {p}: {e}") from None


def pick(ratio: float, table: dict | None = None) -> Pick:
    """The best measured point whose KV bytes fit `ratio` of the full f16 cache (ties: the larger one, as
    the memory is granted and the measured score has its noise). Raises KVMemoryError when no point is
    that small."""
    table = table if table is not None else load_table()
    points = table.get("points", [])
    fits = [p for p in points if p["ratio"] <= ratio + 1e-9]
    if not fits:
        least = min((p["ratio"] for p in points), default=None)
        raise KVMemoryError(f"--kv-memory {ratio:.3g} of the f16 cache: no measured combination is that small "
                            f"(the smallest reaches {least:.3g}); ask for at least that"
                            if least is not None else "the --kv-memory table holds no points")
    best = max(fits, key=lambda p: (p["score"], p["ratio"]))
    k, v = parse_cache_type(best["cache_type"])
    worst = best.get("worst")
    return Pick(k, v, float(best["budget"]), float(best["ratio"]), float(best["score"]), float(ratio),
                float(best.get("swa_budget", 1.0)), None if worst is None else float(worst),
                tuple(int(n) for n in table.get("source", {}).get("lengths", ())))


def full_f16_bytes(layout, n_ctx: int) -> int:
    """K+V bytes of `n_ctx` cells at f16 in every layer: what llama.cpp allocates for edgekv's context (two
    sequences in one unified pool: it keeps a full-size sliding-window cache, "using full-size SWA cache")."""
    return layout.n_head_kv * (layout.head_dim + layout.head_dim_v) * 2 * layout.n_layer * n_ctx


def sized_cells(n_ctx: int, budget: float) -> int:
    """The context (cells) for a budget ratio, as --max-kv-cells: ceil(n_ctx x budget), at least 16."""
    return min(n_ctx, max(16, math.ceil(n_ctx * budget - 1e-9)))


def provenance(table: dict | None = None) -> str:
    """One line on where the table's numbers come from."""
    t = table if table is not None else load_table()
    src = t.get("source", {})
    lengths = src.get("lengths") or []
    at = f" at {', '.join(str(n) for n in lengths)} tokens" if lengths else ""
    return (f"measured on {src.get('model', '?')}, {src.get('task', '?')}{at}, n={src.get('n', '?')} per point, "
            f"{src.get('date', '?')} ({src.get('command', '?')})")


def model_options(ratio: float, base=None):
    """(ModelOptions with the picked cache types, budget, Pick) for the Python API:
    `opts, budget, p = kv_memory.model_options(0.25); Model.load(path, opts)`, then
    `Session(m, budget=budget, swa_budget=p.swa_budget)`."""
    from edgekv.runtime.options import ModelOptions

    p = pick(ratio)
    base = base or ModelOptions()
    return base.with_(cache_type_k=p.cache_type_k, cache_type_v=p.cache_type_v), p.budget, p
