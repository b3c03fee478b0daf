"""The conversation LRU: prefix matching by message keys (images by sha256), byte bound, eviction order."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekv.server.convcache import ConversationCache, snapshot_nbytes


@dataclass(frozen=True)
class Snap:   # the fields of a SessionSnapshot that cost memory
    blob: bytes
    logits: np.ndarray


def snap(n: int) -> Snap:
    return Snap(b"x" * n, np.zeros(10, np.float32))


U1 = ("user", "<__media__>\ndescribe", ("aa",))
A1 = ("assistant", "a cat", ())
U2 = ("user", "what color", ())


def test_longest_strict_prefix_wins_and_images_compare_by_hash():
    c = ConversationCache(10_000)
    c.put([U1, A1], snap(100), n_tokens=300)
    assert c.match([U1, A1]) is None                       # nothing new to prefill: not a match
    hit = c.match([U1, A1, U2])
    assert hit is not None and hit.key == (U1, A1) and hit.n_tokens == 300
    other_image = ("user", "<__media__>\ndescribe", ("bb",))
    assert c.match([other_image, A1, U2]) is None          # same text, different image bytes
    assert c.match([U1, ("assistant", "a dog", ()), U2]) is None
    c.put([U1, A1, U2, A1], snap(100), n_tokens=400, replaces=(U1, A1))
    assert len(c) == 1 and c.match([U1, A1, U2, A1, U2]).n_tokens == 400


def test_byte_bound_evicts_least_recently_used():
    c = ConversationCache(max_bytes=3 * snapshot_nbytes(snap(100)))
    keys = [[("user", f"q{i}", ()), A1] for i in range(4)]
    for k in keys[:3]:
        assert c.put(k, snap(100), 1)
    c.match(keys[0] + [U2])                                # touch the oldest
    c.put(keys[3], snap(100), 1)
    assert c.match(keys[1] + [U2]) is None                 # the least recently used went
    assert c.match(keys[0] + [U2]) is not None and c.stats()["evictions"] == 1
    assert c.nbytes <= c.max_bytes
    assert not c.put([U1], snap(10_000), 1) and c.match([U1, U2]) is None   # bigger than the whole budget


def test_snapshot_nbytes_counts_blob_and_arrays():
    assert snapshot_nbytes(snap(100)) == 100 + 40


def test_tenants_never_match_each_other():
    c = ConversationCache(10_000)
    c.put([U1, A1], snap(100), n_tokens=300, tenant="key-a")
    assert c.match([U1, A1, U2], tenant="key-b") is None and c.match([U1, A1, U2]) is None
    assert c.match([U1, A1, U2], tenant="key-a").n_tokens == 300
    c.drop([U1, A1], tenant="key-b")                       # another tenant's drop does not touch it
    assert len(c) == 1
    c.drop([U1, A1], tenant="key-a")
    assert len(c) == 0
