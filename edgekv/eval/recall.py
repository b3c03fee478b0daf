"""The recall setting of issue 20 as the measurements pass it on: `off`, `ram` or `disk`.

The recall store itself lives in `edgekv.runtime` (a Session keeps the cells compaction evicted and every
question chooses again). The eval and the benches only pass the setting to the compressed Sessions they
create (never to the full-cache reference) and read what the reports say about it. Everything here works
with a runtime that does not know recall yet: `off` passes nothing, and the report fields are read with
getattr.
"""
from __future__ import annotations

import inspect

from edgekv.errors import EdgeKVError

RECALL = ("off", "ram", "disk")
# CompactionReport fields the recall store adds (None when absent: runtime without recall, or recall off)
REPORT_FIELDS = ("recalled", "store_cells", "store_bytes", "reselect_s")


def check_recall(recall: str) -> None:
    """A clear error for an unknown setting, or for ram/disk on a runtime whose Session has no store."""
    if recall not in RECALL:
        raise EdgeKVError(f"--recall must be one of {', '.join(RECALL)}, got {recall!r}")
    if recall != "off" and not runtime_has_recall():
        raise EdgeKVError(f"--recall {recall} needs the recall store (issue 20), which this edgekv.runtime "
                          "does not have yet; use --recall off")


def runtime_has_recall() -> bool:
    from edgekv.runtime import Session

    return "recall" in inspect.signature(Session.__init__).parameters


def session_kwargs(recall: str, recall_dir: str | None = None, recall_type: str = "f16") -> dict:
    """Keyword arguments for `Session(...)`: none for `off`, so a runtime without recall accepts them."""
    if recall == "off":
        return {}
    kw = {"recall": recall, "recall_type": recall_type}
    if recall_dir is not None:
        kw["recall_dir"] = recall_dir
    return kw


def report_fields(reports) -> dict:
    """The recall fields of the given CompactionReports, for a record: `recalled` and `reselect_s` summed
    over them, the store's cells and bytes as the last one saw them; {} when none carries any."""
    out: dict = {}
    for r in reports:
        for name in REPORT_FIELDS:
            v = getattr(r, name, None)
            if v is None:
                continue
            if name in ("recalled", "reselect_s"):
                out[name] = out.get(name, 0) + v
            else:
                out[name] = v
    if "reselect_s" in out:
        out["reselect_s"] = round(float(out["reselect_s"]), 4)
    return out
