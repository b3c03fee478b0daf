"""A disk recall store's re-selection keeps the context on disk (edgekv/runtime/spill.py): the context as read
(the turn's rollback point) and the context written in its place go through llama.cpp's state files.

References: the blob llama.cpp itself returns (`llama_state_seq_get_data`) for the same sequence, and the
same conversation with a RAM store, whose re-selection holds both blobs in memory as before."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from edgekv.errors import Cancelled
from edgekv.kv.codec import parse_state, write_state_file
from edgekv.runtime import Model, Session, spill
from edgekv.runtime.turn import CancelToken

from conftest import THREADS


def load(pairs, variant="qwen2vl", flash_attn="off", **kw) -> Model:
    model, mmproj, _ = pairs[variant]
    return Model.load(model, mmproj, n_ctx=4096, n_batch=2048, threads=THREADS, flash_attn=flash_attn, **kw)


def seq_files(folder) -> list:
    return sorted(folder.glob("edgekv-context-*.seq"))


@pytest.mark.parametrize("flash_attn", ["off", "on"])   # off: V stored transposed in the blob
def test_a_state_file_is_the_blob_and_loads_back(tiny_pairs, tmp_path, flash_attn):
    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs, flash_attn=flash_attn) as m:
        s = Session(m, method="full")
        list(s.chat("Describe the image.", images=[img], max_tokens=2))
        c = s.cache
        blob = s.state_blob()
        f = c.spill_state(tmp_path)
        from_file, from_blob = c.parse(f), parse_state(blob, has_ext=True)
        a, b = from_file.blocks[0], from_blob.blocks[0]
        assert b.v_trans == (flash_attn == "off") and a.v_trans == b.v_trans
        assert np.array_equal(a.pos, b.pos) and np.array_equal(a.ext, b.ext) and a.n_layers == b.n_layers
        for la, lb in zip(a.layers, b.layers):
            assert np.array_equal(la.k, lb.k) and np.array_equal(la.v, lb.v)
            assert np.array_equal(la.v_dim_major(), lb.v_dim_major())
        # our writer makes the file llama.cpp wrote, byte for byte
        again = tmp_path / "again.seq"
        write_state_file(from_blob, again)
        assert again.read_bytes() == f.path.read_bytes()
        list(s.chat("And then?", max_tokens=2))          # the sequence moves on ...
        assert s.state_blob() != blob
        assert c.set_state(f) and s.state_blob() == blob   # ... and the file puts it back exactly
        f.close()
        assert not f.path.exists()
        s.close()


def test_a_disk_store_reselects_as_a_ram_store_with_the_context_on_disk(tiny_pairs, tmp_path):
    """The same two-question conversation with a RAM store and a disk store: the same cells come back
    and the same blob results; the disk store's re-selection went through state files, gone afterwards."""
    _, _, img = tiny_pairs["qwen2vl"]
    blobs, reports = {}, {}
    with load(tiny_pairs) as m:
        for recall in ("ram", "disk"):
            s = Session(m, method="snapkv", budget=0.25, recall=recall, recall_dir=tmp_path, recall_min_share=0.0)
            list(s.chat("Describe the image.", images=[img], max_tokens=2))
            seen = []
            orig = spill.save

            def spy(ctx, seq, folder):
                f = orig(ctx, seq, folder)
                seen.append(f.path)
                return f

            spill.save = spy
            try:
                list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=3))
            finally:
                spill.save = orig
            r = s.reports[-1]
            assert r.reselect and r.rewritten and r.recalled > 0
            blobs[recall], reports[recall] = s.state_blob(), (r.recalled, r.reprefill_tokens)
            assert len(seen) == (1 if recall == "disk" else 0)
            assert all(p.parent == tmp_path for p in seen)
            s.close()
    assert blobs["disk"] == blobs["ram"] and reports["disk"] == reports["ram"]
    gc.collect()
    assert seq_files(tmp_path) == []


def test_a_failed_turn_after_a_disk_reselection_rolls_back_from_the_file(tiny_pairs, tmp_path):
    """The re-selection rewrote the context, then the turn was cancelled: the rollback
    point is the spilled file, and the conversation is as before the turn, byte for byte."""
    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="disk", recall_dir=tmp_path, recall_min_share=0.0)
        list(s.chat("Describe the image.", images=[img], max_tokens=2))
        n0, blob = s.cache.store.n, s.state_blob()
        token, seen, orig = CancelToken(), [], spill.save

        def spy(*a):   # the re-selection read the context into a file: cancel the turn from here on
            seen.append(orig(*a))
            token.cancel()
            return seen[-1]

        loads, set_state = [], s.cache.set_state
        s.cache.set_state = lambda b: loads.append(b) or set_state(b)
        spill.save = spy
        try:
            with pytest.raises(Cancelled):
                list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=2, cancel=token))
        finally:
            spill.save = orig
            del s.cache.set_state
        # the new context went in from a file of its own, then the rollback put the spilled one back
        assert len(seen) == 1 and len(loads) == 2 and all(isinstance(b, spill.StateFile) for b in loads)
        assert loads[0] is not seen[0] and loads[1] is seen[0]
        assert s.state_blob() == blob and s.cache.store.n == n0
        seen.clear(), loads.clear()
        out = list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=2))
        assert out[-1].finish_reason in ("length", "stop") and s.reports[-1].rewritten
        s.close()
    gc.collect()
    assert seq_files(tmp_path) == []


@pytest.mark.parametrize("swa_budget,cache_type", [(1.0, "f16"), (0.5, "f16"), (0.5, "q8_0")])
def test_on_gemma_a_disk_reselection_writes_the_ram_stores_blob(gemma_path, tmp_path, swa_budget, cache_type):
    """Gemma 3 keeps a sliding-window block beside the global one: both go through the files (the question's
    cells cut, or the block thinned), on an f16 or a q8_0 cache, and the result is the RAM store's, byte for
    byte."""
    from test_recall import follow_up

    blobs = {}
    with Model.load(str(gemma_path), None, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="on",
                    cache_type_k=cache_type, cache_type_v=cache_type) as m:
        for recall in ("ram", "disk"):
            got: list = []
            answers, reports = follow_up(m, recall, 0.1, got, recall_dir=tmp_path, recall_min_share=0.0,
                                         swa_budget=swa_budget)
            assert reports[-1].reselect and reports[-1].rewritten
            blobs[recall] = (got[0], answers)
    assert blobs["disk"] == blobs["ram"]
    gc.collect()
    assert seq_files(tmp_path) == []


def test_no_room_for_the_file_holds_the_context_in_memory(tiny_pairs, tmp_path, monkeypatch):
    """The state file cannot be written (a full disk, a folder gone): the re-selection reads the context
    into memory as a RAM store's does, and the follow-up is answered the same."""
    _, _, img = tiny_pairs["qwen2vl"]
    blobs, calls = {}, []
    with load(tiny_pairs) as m:
        for broken in (False, True):
            s = Session(m, method="snapkv", budget=0.25, recall="disk", recall_dir=tmp_path, recall_min_share=0.0)
            list(s.chat("Describe the image.", images=[img], max_tokens=2))
            if broken:
                def full_disk(*a):
                    calls.append(a)
                    raise OSError(28, "No space left on device")
                monkeypatch.setattr(spill, "save", full_disk)
            list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=3))
            assert s.reports[-1].rewritten and s.recall_error is None
            blobs[broken] = s.state_blob()
            s.close()
    assert blobs[True] == blobs[False] and len(calls) == 1


def _check_nbytes(s) -> None:
    c = s.cache
    parsed = c.counted_nbytes

    def no_blob():
        raise AssertionError("nbytes read the blob")

    c.counted_nbytes = no_blob
    try:
        got = c.nbytes()
    finally:
        del c.counted_nbytes
    assert got == parsed() > 0, (got, parsed())


@pytest.mark.parametrize("variant", ["qwen2vl", "llava"])
def test_the_cache_counts_its_bytes_without_reading_the_blob(tiny_pairs, variant):
    """CompressedCache.nbytes from the ledger and llama.cpp's blob size equals the K+V bytes of the blob
    llama.cpp writes (parsed), before and after compaction and recall, M-RoPE cells or not."""
    _, _, img = tiny_pairs[variant]
    with load(tiny_pairs, variant) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="ram", recall_min_share=0.0)
        assert s.cache.nbytes() == 0
        list(s.chat("Describe the image.", images=[img], max_tokens=2))
        _check_nbytes(s)
        list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=2))
        _check_nbytes(s)
        s.close()


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_on_gemma_the_count_takes_the_sliding_window_block_from_the_blob_size(gemma_path, cache_type):
    """Gemma 3: the window block's cells are not in the ledger; the count reads them off the blob's size,
    whole, thinned (--swa-budget) and quantized."""
    from test_recall import needle_doc

    with Model.load(str(gemma_path), None, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="on",
                    cache_type_k=cache_type, cache_type_v=cache_type) as m:
        s = Session(m, method="hybridkv", budget=0.25, swa_budget=0.25)
        s.append_text(needle_doc(), compressible=True)
        _check_nbytes(s)
        s.append_text("\nWhat is the pass key? The pass key is")
        s.compact()
        _check_nbytes(s)
        "".join(r.text for r in s.generate(max_tokens=3))
        _check_nbytes(s)
        s.close()


def test_no_room_for_the_new_context_is_a_clear_error_and_the_turn_is_undone(tiny_pairs, tmp_path, monkeypatch):
    """The context was read into a file, then the new one cannot be written (the disk filled up meanwhile):
    one CompactionError naming the folder, the conversation as before the turn, no file left behind, and
    the same question goes through once there is room."""
    from edgekv.errors import CompactionError
    from edgekv.runtime import regions

    _, _, img = tiny_pairs["qwen2vl"]
    with load(tiny_pairs) as m:
        s = Session(m, method="snapkv", budget=0.25, recall="disk", recall_dir=tmp_path, recall_min_share=0.0)
        list(s.chat("Describe the image.", images=[img], max_tokens=2))
        blob, n0 = s.state_blob(), s.cache.store.n
        write = regions.write_state_file

        def full_disk(*a):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(regions, "write_state_file", full_disk)
        with pytest.raises(CompactionError, match=f"could not write the re-selected cache to {tmp_path}: No space"):
            list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=2))
        assert s.state_blob() == blob and s.cache.store.n == n0
        gc.collect()
        assert seq_files(tmp_path) == []
        monkeypatch.setattr(regions, "write_state_file", write)
        list(s.chat("And what is in the bottom right corner, exactly?", max_tokens=2))
        assert s.reports[-1].rewritten
        s.close()
