"""The fidelity grid: every sample x method x budget, one JSONL record each, resumable.

Per sample the engine prefills once; every (method, budget) then compacts a copy of that cache and is
scored. `full` runs once per sample (budget 1.0) as the reference: retrieval accuracy of the
uncompressed cache, and the reference logits for KL / top-1 agreement. Each finished record is appended
(and fsynced) to `records.jsonl`; a restarted run skips the (sample, method, budget) already there.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edgekv.errors import EdgeKVError
from edgekv.eval import scoring
from edgekv.eval.engine import Engine
from edgekv.eval.tasks import Sample, TaskSpec, build_samples

RECORDS = "records.jsonl"
CONFIG = "config.json"
FULL = "full"


@dataclass
class GridConfig:
    methods: tuple[str, ...]
    budgets: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05)
    spec: TaskSpec = field(default_factory=TaskSpec)
    window: int = 32            # observation window (last W tokens before compact)
    max_new_tokens: int = 8     # greedy tokens generated for retrieval answers
    model: str = ""
    n_ctx: int = 0              # 0: sized from the longest sample
    media: bool = False         # the document delivered as text-in-pixels images
    recall: str = "off"         # the compressed runs' recall store (issue 20); one setting per --out
    cache_types: tuple[str, ...] = ("f16",)   # KV cache types, 'q8_0' or K/V 'q8_0/q4_0' (kv_memory.py)
    flash_attn: str = "off"     # "on" where a quantized V cache needs it (then for every cache type)

    # Fields that change what a sample or a score means: a run may only resume with the same values.
    def identity(self) -> dict:
        s = self.spec
        return {"seed": s.seed, "target_tokens": s.target_tokens, "spec_window": s.window,
                "window": self.window, "max_new_tokens": self.max_new_tokens,
                "model": Path(self.model).name if self.model else "",
                **({"media": True} if self.media else {}),
                **({"recall": self.recall} if self.recall != "off" else {}),
                **({"flash_attn": self.flash_attn} if self.flash_attn != "off" else {})}

    def to_json(self) -> dict:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        return d


F16 = "f16"   # the reference cache type; a record without cache_type is f16


def record_key(sample_key: str, method: str, budget: float, cache_type: str = F16) -> str:
    """f16 keys are the keys of runs made before cache types existed (so they resume)."""
    return f"{sample_key}|{method}|{float(budget):g}" + ("" if cache_type == F16 else f"|{cache_type}")


class RecordStore:
    """Append-only JSONL of finished records; the set of done keys for resuming."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / RECORDS
        self.done: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash mid-write
                if "error" not in rec:
                    self.done[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def is_done(self, key: str, digest: str) -> bool:
        """Finished, for this very sample (records written before digests existed count as done)."""
        rec = self.done.get(key)
        return rec is not None and rec.get("sample_digest", digest) == digest

    def append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if "error" not in rec:
            self.done[rec["key"]] = rec

    def records(self) -> list[dict]:
        return list(self.done.values())


def check_config(out_dir: Path, cfg: GridConfig) -> None:
    """Write config.json, or check that a resumed run measures the same thing."""
    path = Path(out_dir) / CONFIG
    now = {"grid": cfg.to_json(), "identity": cfg.identity(), "python": sys.version.split()[0],
           "platform": platform.platform()}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("identity") != cfg.identity():
            raise EdgeKVError(f"{out_dir} holds a run with other settings ({old.get('identity')} vs "
                              f"{cfg.identity()}); resume with the same settings or choose another --out")
        now["started"] = old.get("started")
        now["resumed"] = old.get("resumed", 0) + 1
    else:
        now["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=2))


def plan_runs(cfg: GridConfig, cache_type: str = F16) -> list[tuple[str, float]]:
    """(method, budget) pairs for one sample: `full` first at 1.0, then the grid (f16 left out of
    --cache-types: its `full` alone, the reference)."""
    runs = [(FULL, 1.0)]
    if cache_type not in cfg.cache_types:
        return runs
    for m in cfg.methods:
        if m == FULL:
            continue
        runs += [(m, float(b)) for b in cfg.budgets]
    return runs


def _base_record(sample: Sample, method: str, budget: float, cache_type: str = F16) -> dict:
    return {"key": record_key(sample.key, method, budget, cache_type), "sample": sample.key, "task": sample.task,
            "length": sample.length, "depth": sample.depth, "index": sample.index, "method": method,
            "budget": float(budget), "n_prompt": sample.n_prompt, "n_context": len(sample.context),
            "sample_digest": sample.digest, "cache_type": cache_type}


def grid_cache_types(cfg: GridConfig) -> tuple[str, ...]:
    """The cache types to run, f16 first: it holds the reference (`full` on f16), so it runs (its `full`
    at least) also when --cache-types leaves it out."""
    return (F16,) + tuple(c for c in cfg.cache_types if c != F16)


def run_cache_types(make_engine: Callable[[str], Engine], cfg: GridConfig, out_dir: str | os.PathLike, *,
                    progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Every cache type in turn (outermost: it is a context parameter, so each loads the model anew):
    `make_engine(cache_type)` builds the engine, the grid runs on it, the engine is closed. The f16 pass
    comes first and keeps the continuation reference logits for the quantized passes."""
    refs: dict[str, np.ndarray] = {}
    records: list[dict] = []
    for ct in grid_cache_types(cfg):
        engine = make_engine(ct)
        try:
            records = run_grid(engine, cfg, out_dir, progress=progress, log=log, cache_type=ct, refs=refs)
        finally:
            engine.close()
    return records


def run_grid(engine: Engine, cfg: GridConfig, out_dir: str | os.PathLike, *,
             samples: list[Sample] | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, cache_type: str = F16,
             refs: dict | None = None) -> list[dict]:
    """Run (or resume) the grid of one cache type (the engine's) into `out_dir`; returns every finished
    record. `refs`: sample key -> the f16 full cache's continuation logits, filled by the f16 pass (when
    other cache types follow), read by the others."""
    out = Path(out_dir)
    check_config(out, cfg)
    store = RecordStore(out)
    if samples is None:
        samples = build_samples(engine.tokenizer, cfg.spec)
    refs = {} if refs is None else refs
    runs = plan_runs(cfg, cache_type)
    todo = [(s, [r for r in runs if not store.is_done(record_key(s.key, *r, cache_type), s.digest)])
            for s in samples]
    if cache_type == F16:   # a continuation sample a quantized pass still needs: its f16 reference logits
        pending = {s.key for s in samples if s.task == "continuation" and s.key not in refs and any(
            not store.is_done(record_key(s.key, *r, ct), s.digest)
            for ct in grid_cache_types(cfg)[1:] for r in plan_runs(cfg, ct))}
        todo = [(s, rs) for s, rs in todo if rs or s.key in pending]
    else:
        todo = [(s, rs) for s, rs in todo if rs]
    total = sum(len(rs) for _, rs in todo)
    bar = _progress(total, progress, desc=f"edgekv eval {cache_type}")
    try:
        for sample, rs in todo:
            _run_sample(engine, cfg, sample, rs, store, bar, log, cache_type, refs)
    finally:
        if bar is not None:
            bar.close()
    return store.records()


def _run_sample(engine, cfg, sample, runs, store, bar, log, cache_type: str = F16, refs: dict | None = None) -> None:
    prefill_s = engine.prefill(sample, cfg.window)
    ref = own = None
    if sample.task == "continuation":
        # the reference logits come from the uncompressed f16 cache, also when `full` itself is done
        engine.compact(FULL, 1.0, cfg.window)
        own = scoring.Reference(engine.eval_logits(sample.target))
        if cache_type == F16 and refs is not None and len(grid_cache_types(cfg)) > 1:
            refs[sample.key] = own.logits   # the logits only: 4 bytes x vocab per token, not Reference's 20
        ref = own if cache_type == F16 else (
            scoring.Reference(refs[sample.key]) if refs and sample.key in refs else None)
    full_f16 = store.done.get(record_key(sample.key, FULL, 1.0))
    for method, budget in runs:
        rec = _base_record(sample, method, budget, cache_type)
        rec["prefill_s"] = round(prefill_s, 4)
        rec["recall"] = "off" if method == FULL else cfg.recall   # the reference never recalls
        t0 = time.perf_counter()
        try:
            info = engine.compact(method, budget, cfg.window)
            rec.update(cells_before=info.cells_before, cells_after=info.cells_after,
                       bytes_before=info.bytes_before, bytes_after=info.bytes_after,
                       compact_s=round(info.seconds, 4), **info.extra)
            if cache_type == F16 and method == FULL:
                full_f16 = rec
            rec["kv_bytes_full_f16"] = (full_f16 or {}).get("kv_bytes")
            if sample.task == "continuation":
                if ref is None:
                    raise EdgeKVError("no f16 reference logits for this sample (the f16 pass did not run it)")
                if method == FULL and ref is own:
                    logits = ref.logits
                else:
                    logits = engine.eval_logits(sample.target)
                rec.update(scoring.continuation_scores(ref, logits, sample.target))
            elif sample.task == "second":
                from edgekv.eval.second import answer_second

                rec.update(answer_second(engine, sample, cfg.max_new_tokens))
            else:
                text = engine.generate(cfg.max_new_tokens)
                hit = scoring.retrieval_hit(text, sample.answer)
                rec.update(score=float(hit), generated=text, answer=sample.answer)
        except EdgeKVError as e:  # a method that refuses (budget, layout) is recorded, not fatal
            rec["error"] = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - one broken method must not stop a 40-minute grid
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=6)
        rec["run_s"] = round(time.perf_counter() - t0, 4)
        store.append(rec)
        if "error" in rec and log:
            log(f"{rec['key']}: {rec['error']}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{sample.task} L{sample.length} {method}@{budget:g}", refresh=False)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)


def load_records(out_dir: str | os.PathLike) -> list[dict]:
    return RecordStore(Path(out_dir)).records()


def iter_errors(out_dir: str | os.PathLike) -> Iterable[dict]:
    path = Path(out_dir) / RECORDS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "error" in rec:
            out.append(rec)
    return out
