"""Streamed compaction of the last media chunk alone (the LastChunk region of runtime/compactor.py): the chunk is marked
with the scratch sequence, read, planned and written back without a host copy of the rest of the cache.
Checked on the real llama.cpp, re-reading the whole state after every chunk: the history is untouched
byte for byte, the cells stay in position order (blob order = the session's bookkeeping), every packed
slot holds a row of that chunk, the result decodes exactly as the same cells written back whole, a turn
rolled back after it returns to the state before the turn, and a refused write puts the chunk back."""
from __future__ import annotations

import numpy as np
import pytest

from edgekv.errors import CompactionError
from edgekv.kv.codec import parse_state

from conftest import THREADS

N_IMAGES = 3


def blocks(s):
    return parse_state(s.state_blob(), has_ext=s.model.layout.mrope).blocks[0]


class Checking:
    """A ChunkCompactor that re-reads the whole state before and after every chunk's compaction."""

    def __init__(self, hook):
        self.hook, self.checked = hook, 0

    def __call__(self, s, n):
        before = blocks(s)
        self.hook(s, n)
        after = blocks(s)
        r = s.reports[-1]
        assert r.chunk_only, r.method
        H = s.model.layout.n_head_kv
        i0 = before.n_cells - n
        assert after.n_cells == s.n_cells == i0 + r.cells_after - (r.cells_before - n)
        assert after.n_cells < before.n_cells
        assert after.n_cells - i0 <= r.budget_cells   # never more than the budget (Plan.capped), pos_max included
        # the history before the chunk: the same cells, byte for byte
        assert np.array_equal(after.pos[:i0], before.pos[:i0])
        for la, lb in zip(after.layers, before.layers):
            assert np.array_equal(la.k[:i0], lb.k[:i0]) and np.array_equal(la.v[:i0], lb.v[:i0])
        # the chunk's cells in position order, its last (pos_max) cell kept whole and last
        assert (np.diff(after.pos[i0:]) >= 0).all() and after.pos[-1] == before.pos[-1]
        for la, lb in zip(after.layers, before.layers):
            assert np.array_equal(la.k[-1], lb.k[-1]) and np.array_equal(la.v[-1], lb.v[-1])
            # every slot holds, per head, the K and V rows of one token of this chunk
            for rows_a, rows_b in ((la.k, lb.k), (la.v, lb.v)):
                a = rows_a[i0:].reshape(rows_a.shape[0] - i0, H, -1)
                b = rows_b[i0:].reshape(n, H, -1)
                for h in range(H):
                    chunk_rows = {bytes(x) for x in b[:, h]}
                    assert all(bytes(x) in chunk_rows for x in a[:, h])
        self.checked += 1


@pytest.mark.parametrize("variant,method", [("llava", "knorm"), ("llava", "auto"), ("qwen2vl", "auto")])
def test_chunk_compaction_rewrites_the_chunk_alone(tiny_pairs, tmp_path, variant, method):
    from edgekv.runtime import Model, Session
    from edgekv.runtime.streaming import streaming

    model_path, mmproj, image = tiny_pairs[variant]
    with Model.load(model_path, mmproj, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="off") as m:
        s = Session(m, method=method, budget=0.25, seed=0)
        check = Checking(streaming(s))
        s.after_media_chunk = check
        answer = [r.token for r in s.chat("describe", [image] * N_IMAGES, max_tokens=4)]
        assert check.checked == N_IMAGES
        if method == "auto":  # a probe window (generic) and hybridkv between chunks
            assert all(r.resolved == "hybridkv" and r.probe == "generic" for r in s.reports[:N_IMAGES])
        # the cells decode exactly as the same cells written back whole (a fresh session loading them)
        path = s.save(tmp_path / "conv.edgekv")
        nxt = [r.token for r in s.chat("and then?", max_tokens=4)]
        logits = s.cache.logits.copy()
        s.close()
        s2 = Session.load(m, path)
        assert [r.token for r in s2.chat("and then?", max_tokens=4)] == nxt
        assert np.array_equal(s2.cache.logits, logits)
        assert answer  # the first turn answered
        s2.close()


def test_a_turn_rolled_back_after_a_chunk_compaction_is_as_before(tiny_pairs):
    from edgekv.runtime import Model, Session
    from edgekv.runtime.streaming import streaming

    model_path, mmproj, image = tiny_pairs["llava"]
    with Model.load(model_path, mmproj, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="off") as m:
        s = Session(m, budget=0.25, seed=0)
        streaming(s)
        list(s.chat("first", [image], max_tokens=2))
        blob, n_cells, n_reports = s.state_blob(), s.n_cells, len(s.reports)

        def fail_on_second_image(stage, done, total):
            if stage == "image" and done == 2:
                raise RuntimeError("stop here")

        s.progress = fail_on_second_image
        with pytest.raises(RuntimeError):
            list(s.chat("two more", [image, image], max_tokens=2))
        # the turn's first image was compacted on its own (no rollback blob kept), then the turn failed
        assert s.n_cells == n_cells and len(s.reports) == n_reports
        same = s.state_blob() == blob   # a bool: pytest would diff two blobs byte by byte on failure
        assert same
        s.progress = None
        assert [r.token for r in s.chat("again", max_tokens=2)]  # the session goes on
        s.close()


def test_a_refused_chunk_write_puts_the_chunk_back(tiny_pairs, monkeypatch):
    from edgekv.runtime import Model, Session
    from edgekv.runtime.regions import LastChunk

    model_path, mmproj, image = tiny_pairs["llava"]
    with Model.load(model_path, mmproj, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="off") as m:
        s = Session(m, method="knorm", budget=0.25, seed=0, probe=False)
        s.append_prompt("look: <__media__>", [image])
        blob, kind = s.state_blob(), s.cache.kind.copy()
        assert s.cache.chunk_range(s.candidates()) is not None
        real, calls = LastChunk._set, []

        def refuse_first(self, buf):   # llama.cpp refusing the packed chunk (e.g. no free cells)
            calls.append(len(buf))
            return False if len(calls) == 1 else real(self, buf)

        monkeypatch.setattr(LastChunk, "_set", refuse_first)
        with pytest.raises(CompactionError, match="original chunk was restored"):
            s.compact(early=True)
        assert len(calls) == 2 and calls[1] > calls[0]     # the packed chunk, then the original one
        same = s.state_blob() == blob
        assert same and np.array_equal(s.cache.kind, kind)
        monkeypatch.undo()
        r = s.compact(early=True)
        assert r.chunk_only and s.n_cells < len(kind)
        s.close()


def test_capped_plans_keep_each_rows_best_tokens():
    from edgekv.plan import Plan

    keep = np.array([[[4, 0, 2, 1], [3, 1, 0, 2]]])          # best first; head 0's own budget is 4, head 1's 2
    plan = Plan(keep=keep, nominal=np.array([[4, 2]]), info={"method": "x"})
    c = plan.capped(3)
    assert c.n_slots == 3 and np.array_equal(c.keep, keep[..., :3])
    assert c.nominal.tolist() == [[3, 2]] and c.info["capped_from"] == 4
    assert plan.capped(4) is plan and plan.capped(9) is plan
