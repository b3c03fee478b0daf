"""Captioning on Ray Data: `map_batches` with a stateful class, one loaded model per actor.

For Ray users who build their own pipeline:

    import ray
    from edgekv.caption.captioner import CaptionConfig
    from edgekv.caption.ray_runner import RayCaptioner

    cfg = CaptionConfig(model="model.gguf", mmproj="mmproj.gguf", threads=4).to_dict()
    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(RayCaptioner, fn_constructor_kwargs={"config": cfg}, batch_size=1,
                        concurrency=4, num_gpus=1)      # one model per actor, one actor per GPU
    for row in ds.iter_rows(): ...                     # row["record"]: the JSONL record (a JSON string)

Paths (images and GGUFs) must be readable on every node: a shared filesystem, as for any Ray job.
`caption_with_ray` is what `edgekv caption --ray` runs: the driver decides what is left to do before
scheduling and writes each record as it streams back, so resume works as in a single process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from edgekv.errors import EdgeKVError


class RayNotAvailable(EdgeKVError):
    """Ray (the `edgekv[ray]` extra) is not installed or the cluster cannot be reached."""


def _reason(e: BaseException) -> str:
    """The edgekv error inside a Ray exception's text (its traceback is the worker's), else its last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("edgekv.errors."):
            return ln.split(": ", 1)[-1] + "".join(f" {x}" for x in lines[i + 1:i + 3] if not x.startswith("("))
    return lines[-1] if lines else type(e).__name__


class RayRunError(EdgeKVError):
    """A worker failed as a whole (not one input): e.g. it could not load the model."""


class RayCaptioner:
    """The stateful Ray Data UDF: loads the model once per actor, captions a batch of paths."""

    def __init__(self, config: dict) -> None:
        from edgekv.caption.captioner import CaptionConfig, Captioner

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.captioner = Captioner(CaptionConfig(**config))
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        from edgekv.runtime.session import peak_rss_mb

        records, workers, rss = [], [], []
        for p in batch["path"]:
            records.append(json.dumps(self.captioner.caption(Path(str(p))), ensure_ascii=False))
            workers.append(self.worker)
            rss.append(peak_rss_mb())
        return {"path": [str(p) for p in batch["path"]], "record": records, "worker": workers, "peak_rss_mb": rss}


def init_ray(address: str | None, num_cpus: int | None = None):
    """Connect to `address` ('auto', 'ray://host:10001', host:port) or start a local Ray (None/'local')."""
    try:
        import ray
    except ImportError:
        raise RayNotAvailable("--ray needs Ray: pip install 'edgekv[ray]'") from None
    if ray.is_initialized():
        return ray
    try:
        if address in (None, "local"):
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise RayNotAvailable(f"cannot reach the Ray cluster at {address}: {e}") from None
    return ray


def caption_with_ray(paths: Iterable[Path], config: dict, *, concurrency: int = 1, num_gpus: float = 0,
                     num_cpus: float | None = None,
                     on_record: Callable[[Path, dict, str, float], None] | None = None) -> None:
    """Caption `paths` on the connected Ray (see init_ray); on_record(path, record, worker, peak_rss_mb)
    is called on the driver for every result as it arrives."""
    import logging

    import ray

    paths = [str(p) for p in paths]
    if not paths:
        return
    # Our own progress bar and summary report the run; Ray Data's would interleave with them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=min(len(paths), 1000))
    opts = {"num_gpus": num_gpus} if num_gpus else {}
    if num_cpus is not None:
        opts["num_cpus"] = num_cpus
    try:  # few blocks queued per actor: an even spread, and little finished-but-unwritten work on a kill
        compute = ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=2)
    except TypeError:
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    ds = ds.map_batches(RayCaptioner, fn_constructor_kwargs={"config": config}, batch_size=1, compute=compute,
                        **opts)
    try:
        for row in ds.iter_rows():
            on_record(Path(row["path"]), json.loads(row["record"]), row["worker"], float(row["peak_rss_mb"]))
    except (ray.exceptions.RayError, ray.data.exceptions.UserCodeException) as e:
        # e.g. an actor could not load the model: the records written so far stay, a rerun resumes
        raise RayRunError(f"the Ray run stopped: {_reason(e)}") from None
