"""The recall setting of issue 20 as the measurements pass it on: `off`, `ram` or `disk`.

The recall store itself lives in `edgekv.runtime` (a Session keeps the cells compaction evicted and every
question chooses again). The eval and the benches only pass the setting to the compressed Sessions they
create (never to the full-cache reference) and read what the reports say about it: `off` passes nothing,
so the records of a run without recall are the ones written before recall existed.
"""
from __future__ import annotations

from edgekv.errors import EdgeKVError

# -last: prefill the question's last token alone again; -x2: choose twice per question (Session.recall_passes);
# -gN: bring cells back only when a head gets N % of its window attention from them (Session.recall_min_share)
RECALL = ("off", "ram", "disk", "ram-last", "disk-last", "ram-x2", "disk-x2", "ram-gN", "disk-gN")   # N: 0-99
# CompactionReport fields the recall store adds (None when absent: runtime without recall, or recall off)
REPORT_FIELDS = ("recalled", "store_cells", "store_bytes", "reselect_s")


def check_recall(recall: str) -> None:
    """A clear error for an unknown setting."""
    mode, *opts = recall.split("-")
    ok = recall == "off" or (mode in ("ram", "disk") and all(
        o in ("last", "x2") or (o[:1] == "g" and o[1:].isdigit() and int(o[1:]) < 100) for o in opts))
    if not ok:
        raise EdgeKVError(f"--recall must be one of {', '.join(RECALL)} (N: 0-99), got {recall!r}")


def session_kwargs(recall: str, recall_dir: str | None = None, recall_type: str | None = None) -> dict:
    """Keyword arguments for `Session(...)`: none for `off`, so a runtime without recall accepts them."""
    if recall == "off":
        return {}
    mode, *opts = recall.split("-")
    kw = {"recall": mode, "recall_type": recall_type, "recall_reprefill": "last" if "last" in opts else "question"}
    if "x2" in opts:
        kw["recall_passes"] = 2
    for o in opts:
        if o[:1] == "g":
            kw["recall_min_share"] = int(o[1:]) / 100
    if recall_dir is not None:
        kw["recall_dir"] = recall_dir
    return kw


def report_fields(reports) -> dict:
    """The recall fields of the given CompactionReports, for a record: `recalled` and `reselect_s` summed
    over them, the store's cells and bytes as the last one saw them; {} when none carries any."""
    out: dict = {}
    for r in reports:
        if hasattr(r, "store_where") and r.store_where is None:   # recall off: nothing to say
            continue
        for name in REPORT_FIELDS:
            v = r.seconds if name == "reselect_s" and getattr(r, "reselect", False) else getattr(r, name, None)
            if v is None:
                continue
            if name in ("recalled", "reselect_s"):
                out[name] = out.get(name, 0) + v
            else:
                out[name] = v
    if "reselect_s" in out:
        out["reselect_s"] = round(float(out["reselect_s"]), 4)
    shares = [r.info["recall_share"] for r in reports if "recall_share" in getattr(r, "info", {})]
    if shares:      # the largest share of a head's window attention that came (or would come) back
        out["recall_share"] = max(shares)
    return out
