"""The batch around the engine: what is left to do (resume), the single-process loop with its progress
bar, and the end-of-run summary. Records are written (and fsynced) one input at a time, so a kill loses
at most the input in flight."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from edgekv.runtime.session import peak_rss_mb

# Testing knob: seconds to wait between captioning an input and writing its record, so a test can kill
# the process while an input is in flight at a known point. Not for users.
DELAY_ENV = "EDGEKV_CAPTION_DELAY"


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    savings: list[float] = field(default_factory=list)   # 1 - cells_after / cells_before per caption
    seconds: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # worker -> MiB
    failures: list[tuple[str, str]] = field(default_factory=list)
    unit: str = "images"   # "files" when the batch has videos
    warnings: list[tuple[str, str]] = field(default_factory=list)  # done, but e.g. from part of a broken video

    def add(self, name: str, record: dict) -> None:
        if "error" in record:
            self.failed += 1
            self.failures.append((name, record["error"]))
            return
        self.done += 1
        if record.get("warning"):
            self.warnings.append((name, record["warning"]))
        before, after = record.get("kv_cells_before"), record.get("kv_cells_after")
        if before:
            self.savings.append(1.0 - after / before)

    def lines(self) -> list[str]:
        rate = self.done / self.seconds if self.seconds else 0.0
        save = f"{100 * sum(self.savings) / len(self.savings):.1f} %" if self.savings else "n/a"
        rss = ", ".join(f"{k} {v:.0f} MiB" for k, v in self.peak_rss_mb.items()) or "n/a"
        out = [f"captioned {self.done}, skipped {self.skipped} (already done), failed {self.failed} "
               f"of {self.total} in {self.seconds:.1f} s ({rate:.2f} {self.unit}/s)",
               f"mean KV saving {save} of the cells; peak RSS {rss}"]
        for name, warn in self.warnings[:10]:
            out.append(f"warning: {name}: {warn}")
        if len(self.warnings) > 10:
            out.append(f"... and {len(self.warnings) - 10} more warnings")
        for name, err in self.failures[:10]:
            out.append(f"failed: {name}: {err.splitlines()[0] if err else ''}")
        if len(self.failures) > 10:
            out.append(f"... and {len(self.failures) - 10} more failures")
        return out


def plan(images: list[Path], sink, overwrite: bool) -> tuple[list[Path], int]:
    """(inputs still to caption, number skipped because already done). Two images that would share a
    sidecar (a.png, a.jpg) are both kept; the later one overwrites, as kohya's scripts do."""
    sink.prepare(images, overwrite)
    if overwrite:
        return list(images), 0
    todo = [p for p in images if not sink.done(p)]
    return todo, len(images) - len(todo)


def progress_bar(total: int, enabled: bool, unit: str = "images"):
    """unit: Summary.unit ("images", or "files" when the batch has videos)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img" if unit == "images" else "file", disable=not enabled or not sys.stderr.isatty(), file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def run_local(captioner, todo: Iterable[Path], sink, summary: Summary, show_progress: bool = True,
              on_record: Callable[[Path, dict], None] | None = None) -> Summary:
    """Caption `todo` in order with one Captioner, writing each record before starting the next input."""
    todo = list(todo)
    delay = float(os.environ.get(DELAY_ENV) or 0)
    t0 = time.perf_counter()
    with progress_bar(len(todo), show_progress, summary.unit) as bar:
        for path in todo:
            rec = captioner.caption(path)
            if delay:
                time.sleep(delay)
            rec = sink.write(path, rec)
            summary.add(sink.key(path), rec)
            if on_record:
                on_record(path, rec)
            bar.update(1)
    summary.seconds += time.perf_counter() - t0
    summary.peak_rss_mb[f"pid {os.getpid()}"] = peak_rss_mb()
    return summary
