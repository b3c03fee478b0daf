"""Save a conversation to one file, load it in a fresh process, continue identically; refuse files that
another model, cache type or version wrote with a clear error (never a llama.cpp abort)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekv.errors import SaveFormatError
from edgekv.runtime import Model, Session

from conftest import THREADS

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys, numpy as np
from edgekv.runtime import Model, Session
model, mmproj, image, path, mode, out = sys.argv[1:7]
with Model.load(model, mmproj, n_ctx=4096, n_batch=2048, threads=2, flash_attn="off") as m:
    if mode == "save":
        s = Session(m, method="snapkv", budget=0.25)
        list(s.chat("What is in the image?", [image], max_tokens=4))
        s.save(path)
    else:
        s = Session.load(m, path)
    recs = list(s.chat("And the colours?", max_tokens=6))
    np.savez(out, tokens=[r.token for r in recs], logits=s.logits, cells=s.n_cells,
             roles=[x["role"] for x in s.messages], method=s.reports[0].method, n_reports=len(s.reports))
    s.close()
"""


def run(*args) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


def test_saved_conversation_continues_identically_in_a_fresh_process(tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    path = tmp_path / "chat.edgekv"
    run(model, mmproj, image, path, "save", tmp_path / "a.npz")
    run(model, mmproj, image, path, "load", tmp_path / "b.npz")
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert list(a["tokens"]) == list(b["tokens"])
    np.testing.assert_array_equal(a["logits"], b["logits"])           # flash attention off: bit-identical
    assert int(a["cells"]) == int(b["cells"])
    assert list(b["roles"]) == ["user", "assistant"] * 2
    assert str(b["method"]) == str(a["method"]) and int(b["n_reports"]) == 1   # the compaction came along


@pytest.fixture()
def saved_file(tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    with Model.load(model, mmproj, n_ctx=4096, n_batch=2048, threads=THREADS, flash_attn="off") as m:
        s = Session(m, method="snapkv", budget=0.25, auto_compact=False)   # ~290 cells
        list(s.chat("What is in the image?", [image], max_tokens=3))
        path = s.save(tmp_path / "chat.edgekv")
        s.close()
    return path


def test_other_model_is_refused(tiny_pairs, saved_file):
    model, mmproj, _ = tiny_pairs["qwen2vl"]
    with Model.load(model, mmproj, n_ctx=4096, threads=THREADS, flash_attn="off") as m:
        with pytest.raises(SaveFormatError, match="different model file"):
            Session.load(m, saved_file)
        Session(m).close()  # no session was left attached


@pytest.mark.parametrize("kw,match", [(dict(cache_type_k="q8_0"), "K cache type"),
                                      (dict(flash_attn="on"), "flash-attention"),
                                      (dict(n_ctx=256), "raise -c")])
def test_other_cache_settings_are_refused(tiny_pairs, saved_file, kw, match):
    model, mmproj, _ = tiny_pairs["llava"]
    opts = dict(n_ctx=4096, threads=THREADS, flash_attn="off") | kw
    with Model.load(model, mmproj, **opts) as m:
        with pytest.raises(SaveFormatError, match=match):
            Session.load(m, saved_file)


def test_other_version_and_damaged_files_are_refused(tiny_pairs, saved_file, tmp_path):
    data = saved_file.read_bytes()
    n = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[16:16 + n])
    header["llama_cpp_python"] = "0.0.1"
    head = json.dumps(header).encode()
    other = tmp_path / "other.edgekv"
    other.write_bytes(data[:12] + struct.pack("<I", len(head)) + head + data[16 + n:])
    cut = tmp_path / "cut.edgekv"
    cut.write_bytes(data[: len(data) // 2])
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    model, mmproj, _ = tiny_pairs["llava"]
    with Model.load(model, mmproj, n_ctx=4096, threads=THREADS, flash_attn="off") as m:
        with pytest.raises(SaveFormatError, match="llama-cpp-python"):
            Session.load(m, other)
        with pytest.raises(SaveFormatError, match="damaged or cut short"):
            Session.load(m, cut)
        with pytest.raises(SaveFormatError, match="not a saved edgekv conversation"):
            Session.load(m, notes)
        with pytest.raises(SaveFormatError, match="cannot read"):
            Session.load(m, tmp_path / "missing.edgekv")
        s = Session.load(m, saved_file, budget=0.5)                 # and the good one loads
        assert s.budget == 0.5 and [x["role"] for x in s.messages] == ["user", "assistant"]
        s.close()
