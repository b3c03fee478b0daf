"""Captioning on Ray Data: `map_batches` with a stateful class, one loaded model per actor.

For Ray users who build their own pipeline:

    import ray
    from edgekv.caption.captioner import CaptionConfig
    from edgekv.caption.ray_runner import RayCaptioner
    from edgekv.runtime.options import ModelOptions

    cfg = CaptionConfig(model="model.gguf", mmproj="mmproj.gguf", model_options=ModelOptions(threads=4)).to_dict()
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
import socket
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


CONNECT_TIMEOUT_S = 5.0  # a cluster address that does not answer in this time is an error, not a retry loop


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port' or 'ray://host:port'; None when the address names no port ('auto')."""
    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with one line, when nothing listens at the cluster's address: ray.init would retry for
    minutes, printing a warning every few seconds."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        why = "no answer" if isinstance(e, socket.timeout) else (e.strerror or str(e) or type(e).__name__)
        raise RayNotAvailable(f"cannot reach the Ray cluster at {address}: {why} (tried for up to "
                              f"{timeout:.0f} s); check the address and that the cluster is up") from None


# Run by `python -c` next to a driver that started a local Ray. It reads the driver's end of a pipe: EOF
# means the driver is gone (even by kill -9). Until then it notes, every second, Ray's processes (the
# head processes given as arguments and all their descendants: agents, workers); then it ends those
# still running. Ray ends its head processes with the driver, but its dashboard and runtime-env agents
# wait a minute on the dead GCS first.
_REAPER = """
import select, sys, psutil
roots, seen = [int(a) for a in sys.argv[1:]], {}
def scan():
    for r in roots:
        try:
            top = psutil.Process(r)
            procs = [top] + top.children(recursive=True)
        except psutil.Error:
            continue
        for p in procs:
            seen.setdefault(p.pid, p)
while True:
    scan()
    if select.select([sys.stdin], [], [], 1.0)[0] and not sys.stdin.buffer.read1(64):
        break
left = [p for p in seen.values() if p.is_running()]  # is_running: the same process, not a reused pid
for p in left:
    try:
        p.terminate()
    except psutil.Error:
        pass
for p in psutil.wait_procs(left, timeout=3)[1]:
    try:
        p.kill()
    except psutil.Error:
        pass
"""
_reaper = None  # the reaper's Popen: holding it keeps the pipe's write end open for the driver's life


def _start_reaper() -> None:
    """Make the local Ray this process started end with it, however it ends (see _REAPER)."""
    global _reaper
    import subprocess
    import sys

    try:
        from ray._private import worker

        pids = [i.process.pid for infos in worker._global_node.all_processes.values() for i in infos
                if getattr(i, "process", None) is not None]
    except Exception:  # another Ray version: every child of this process is Ray's at this point
        try:
            import psutil

            pids = [p.pid for p in psutil.Process().children()]
        except Exception:
            return  # no psutil (a Ray dependency): Ray's own fate-sharing only
    if pids:
        _reaper = subprocess.Popen([sys.executable, "-c", _REAPER, *map(str, pids)], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def init_ray(address: str | None, num_cpus: int | None = None):
    """Connect to `address` ('auto', 'ray://host:10001', host:port) or start a local Ray (None/'local'),
    which ends with this process (even on kill -9: see _REAPER)."""
    local = address in (None, "local")
    if not local:
        # Something answers there, maybe not Ray: Ray's own wait would be 20 tries of 30 s. One try of
        # CONNECT_TIMEOUT_S instead (a user's own RAY_* settings win); set before Ray is imported, which
        # reads them.
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(int(CONNECT_TIMEOUT_S)))
    try:
        import ray
    except ImportError:
        raise RayNotAvailable("--ray needs Ray: pip install 'edgekv[ray]'") from None
    if ray.is_initialized():
        return ray
    if not local:
        check_reachable(address)
    try:
        if local:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError) as e:
        raise RayNotAvailable(f"cannot reach the Ray cluster at {address}: {e}") from None
    if local:
        _start_reaper()
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
