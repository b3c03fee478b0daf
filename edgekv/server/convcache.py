"""Kept conversations: after each turn the conversation's compacted cache (a Session snapshot: state
blob + bookkeeping) stays in host RAM, in an LRU bounded in bytes.

A conversation is keyed by its messages: (role, text with media markers, sha256 of each image). A request
whose messages extend a kept conversation restores it and prefills only the new messages, so its images
are not encoded again. One entry per conversation: a turn's entry replaces the one it extended. Entries
belong to a tenant (the API key's hash when the server has keys): a request only ever matches its own."""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

MessageKey = tuple[str, str, tuple[str, ...]]   # (role, text with markers, image sha256s)


@dataclass(frozen=True)
class Kept:
    key: tuple[MessageKey, ...]
    tenant: str
    snapshot: Any          # edgekv.runtime.session.SessionSnapshot
    n_tokens: int          # prompt + answer tokens the cache stands for (usage.prompt_tokens_details.cached_tokens)
    nbytes: int
    disk_bytes: int = 0    # its recall store's rows in a file (--recall disk)


def snapshot_nbytes(obj: Any) -> int:
    """Host bytes a snapshot holds, walked through: the state blob, the ledger's arrays (logits, query
    window, kinds, positions), the messages and cached text, the text marks' sliding-window blocks."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, str):
        return len(obj.encode())
    if isinstance(obj, (tuple, list)):
        return sum(snapshot_nbytes(v) for v in obj)
    if isinstance(obj, dict):
        return sum(snapshot_nbytes(v) for v in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (sum(snapshot_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
                + store_bytes(obj))
    return 0


def store_bytes(marks: Any, mode: str = "ram") -> int:
    """A kept conversation's recall store rows (its first store_n rows) in host RAM, or with mode="disk"
    in its file (counted against the disk cap, not --cache-ram)."""
    store = getattr(marks, "store", None)
    if store is None or store.mode != mode or store.layout is None:
        return 0
    return int(marks.store_n) * store.layout.row_bytes


class ConversationCache:
    def __init__(self, max_bytes: int, max_disk_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes   # kept conversations' disk recall stores (None: no cap)
        self._entries: OrderedDict[tuple[str, tuple[MessageKey, ...]], Kept] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, key: Sequence[MessageKey], tenant: str = "") -> Kept | None:
        """The tenant's longest kept conversation that `key` strictly extends (there must be a new message)."""
        key = tuple(key)
        with self._lock:
            best = None
            for (t, k), e in self._entries.items():
                if t != tenant or len(k) >= len(key) or key[: len(k)] != k:
                    continue
                if best is None or len(k) > len(best.key):
                    best = e
            if best is None:
                self.misses += 1
                return None
            self._entries.move_to_end((tenant, best.key))
            self.hits += 1
            return best

    def put(self, key: Sequence[MessageKey], snapshot: Any, n_tokens: int, replaces: Hashable | None = None,
            tenant: str = "") -> bool:
        """Keep a finished turn. Evicts least recently used conversations to stay within max_bytes; a
        snapshot larger than the whole budget is not kept. Returns whether it was kept."""
        entry = Kept(tuple(key), tenant, snapshot, n_tokens, snapshot_nbytes(snapshot),
                     store_bytes(getattr(snapshot, "marks", None), "disk"))
        disk_cap = float("inf") if self.max_disk_bytes is None else self.max_disk_bytes
        with self._lock:
            if replaces is not None:
                self._entries.pop((tenant, tuple(replaces)), None)
            if entry.nbytes > self.max_bytes or entry.disk_bytes > disk_cap:
                return False
            self._entries[(tenant, entry.key)] = entry
            self._entries.move_to_end((tenant, entry.key))
            while (sum(e.nbytes for e in self._entries.values()) > self.max_bytes
                   or sum(e.disk_bytes for e in self._entries.values()) > disk_cap):
                self._entries.popitem(last=False)   # its store file goes once nothing holds it
                self.evictions += 1
            return True

    def drop(self, key: Sequence[MessageKey], tenant: str = "") -> None:
        """Forget a kept conversation (its state would not restore)."""
        with self._lock:
            self._entries.pop((tenant, tuple(key)), None)

    def get_nbytes(self, key: Sequence[MessageKey] | None, tenant: str = "") -> int:
        e = self._entries.get((tenant, tuple(key))) if key is not None else None
        return e.nbytes if e is not None else 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"conversations": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                    "disk_bytes": sum(e.disk_bytes for e in self._entries.values()),
                    "max_disk_bytes": self.max_disk_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
