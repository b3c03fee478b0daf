"""Text in pixels on a tiny model (no Gemma needed): the projector hands the model its own embeddings,
and `edgekv eval --media --regime ...` runs every regime end to end; the widened task grid."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from conftest import THREADS
from edgekv.cli.main import cli


def test_tokens_as_images_read_like_tokens_as_text(tiny_pairs, tmp_path):
    """Tiny llama (f16 embeddings): the same 256 tokens as text or as one image give (nearly) the same
    next-token logits after a text suffix; other tokens as the image do not."""
    from edgekv.eval.pixels import PixelCodec, build_projector
    from edgekv.runtime import Model, Session
    from edgekv.runtime.lib import mtmd_cpp

    text_model = tiny_pairs["llava"][0]
    proj, codec = build_projector(text_model, tmp_path), PixelCodec.for_model(text_model, tmp_path)
    assert codec.tokens_per_image == 256 and build_projector(text_model, tmp_path) == proj  # cached
    rng = np.random.default_rng(0)
    doc = rng.integers(262, 380, 256).tolist()
    other = rng.integers(262, 380, 256).tolist()
    marker = mtmd_cpp.mtmd_default_marker().decode()
    with Model.load(text_model, proj, n_ctx=1024, threads=THREADS, flash_attn="off") as m:
        def logits(as_image, ids):
            s = Session(m, method="full", auto_compact=False)
            s.append_tokens([1])
            if as_image:
                s.append_prompt(marker, codec.encode(ids, pad=0))
            else:
                s.append_tokens(ids, compressible=True, capture=False)
            s.append_tokens([300, 301, 302])
            out = s.logits.copy()
            s.close()
            return out

        text, image, wrong = logits(False, doc), logits(True, doc), logits(True, other)
    assert np.abs(text - image).max() < 0.02 * np.abs(text).max()
    assert np.abs(text - wrong).max() > 10 * np.abs(text - image).max()


def test_eval_media_runs_every_regime(tiny_pairs, tmp_path):
    out = tmp_path / "media"
    r = CliRunner().invoke(cli, ["eval", "--quick", "--media", "--regime", "all", "-m", str(tiny_pairs["llava"][0]),
                                 "--tasks", "passkey,pair", "--out", str(out), "--no-plots", "--no-progress",
                                 "-t", str(THREADS)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert not [x for x in recs if "error" in x], recs
    by = {(x["task"], x["method"]): x for x in recs}
    for task in ("passkey", "pair"):
        assert by[(task, "snapkv")]["regime"] == "after" and by[(task, "snapkv")]["window_rows"] > 0
        assert "probe: generic" in by[(task, "snapkv@before")]["resolved"]
        assert "probe: question" in by[(task, "snapkv@known")]["resolved"]
        assert by[(task, "streaming@before")]["regime"] == "before"
        assert "probe_tokens" not in by[(task, "streaming@before")]
        for m in ("snapkv", "snapkv@before", "snapkv@known"):
            x = by[(task, m)]
            assert x["n_context"] % 256 == 0 and x["cells_after"] < x["cells_before"]
    assert "every needle task pooled" in (out / "results.md").read_text()


def test_wider_grid_tasks_and_fillers():
    from edgekv.eval.report import wilson
    from edgekv.eval.tasks import TaskSpec, build_samples

    class Tok:
        bos_id = None

        def encode(self, text):
            return [ord(c) % 256 for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    spec = TaskSpec(tasks=("passkey", "word", "pair"), lengths=(512,), depths=(0.5,), samples=2)
    samples = build_samples(Tok(), spec)
    assert [s.task for s in samples] == ["passkey"] * 2 + ["word"] * 2 + ["pair"] * 2
    assert {s.source for s in samples} == {"docs", "license"}
    for s in samples:
        ctx = Tok().decode(s.context)
        assert s.answer in ctx and len(s.prefix) + len(s.context) + len(s.question) == 512
        if s.task == "pair":
            assert s.meta["distractor"] in ctx and s.meta["distractor"] not in Tok().decode(s.question)
    lo, hi = wilson(12, 24)
    assert 0.29 < lo < 0.33 and 0.67 < hi < 0.71      # 0.5 with n = 24: about +-0.19
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
