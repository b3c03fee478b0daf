"""Text in pixels: the real Gemma 3 270M reads a document delivered as images through mtmd."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import THREADS

pytestmark = pytest.mark.gemma

NEEDLE_KEY = "58213"


@pytest.fixture(scope="module")
def pixels(gemma_path, tmp_path_factory):
    from edgekv.eval.pixels import PixelCodec, build_projector

    d = tmp_path_factory.mktemp("pixels")
    return build_projector(gemma_path, d), PixelCodec.for_model(gemma_path, d)


@pytest.fixture(scope="module")
def model(gemma_path, pixels):
    from edgekv.runtime import Model

    with Model.load(gemma_path, pixels[0], n_ctx=2048, threads=THREADS, flash_attn="off") as m:
        yield m


def test_codec_decodes_the_embeddings_and_fills_exact_images(pixels):
    _, codec = pixels
    ids = np.arange(5000, 5300)
    err = codec.decoded(ids) - codec.emb.rows(ids)
    assert np.sqrt((err ** 2).mean()) < 1e-4
    assert np.abs(err).max() <= codec.step.max() / 2 + 1e-6
    images = codec.encode(ids, pad=0)
    assert len(images) == 2 and all(im.shape == (336, 336, 3) and im.dtype == np.uint8 for im in images)
    # patch (0, 1) of image 0 holds token 1: its first byte slot (channel 0, row 0, col 0) is code >> 8
    assert images[0][0, 21, 0] == codec.codes([ids[1]])[0, 0] >> 8
    assert (np.asarray(codec.step, np.float16).astype(np.float32) == codec.step).all()


def document(model, codec, n_filler: int = 500):
    """(prefix ids, context ids, question text): a pass key in the middle of real filler."""
    from edgekv.eval.tasks import Haystack

    class Tok:
        bos_id = None

        def encode(self, text):
            return model.tokenize(text, add_bos=False, special=False)

    hay = Haystack(Tok())
    pieces = [t for p in hay.take(n_filler, 3) for t in p]
    needle = model.tokenize(f"The pass key is: {NEEDLE_KEY}. Remember it. {NEEDLE_KEY} is the pass key.\n\n",
                            add_bos=False, special=False)
    mid = len(pieces) // 2
    context = pieces[:mid] + needle + pieces[mid:]
    prefix = model.tokenize("There is a pass key hidden in the text. Find it.\n\n", add_bos=True, special=False)
    return prefix, context, "\n\nWhat is the pass key? The pass key is:"


def media_session(model, codec, **kw):
    from edgekv.runtime import Session
    from edgekv.runtime.lib import mtmd_cpp

    s = Session(model, auto_compact=False, **kw)
    prefix, context, question = document(model, codec)
    s.append_tokens(prefix)
    images = codec.encode(context, pad=model.tokenize("\n", add_bos=False, special=False)[-1])
    s.append_prompt(mtmd_cpp.mtmd_default_marker().decode() * len(images), images)
    return s, images, question


def answer(s) -> str:
    return "".join(r.text for r in s.generate(max_tokens=8))


def test_needle_inside_image_chunks_survives_full(model, pixels):
    s, images, question = media_session(model, pixels[1], method="full", budget=1.0)
    assert len(images) >= 2
    media = s.cache.media[s.cache.media >= 0]
    assert len(np.unique(media)) == len(images) and (s.cache.kind == 1).sum() == 256 * len(images)
    s.append_text(question)
    assert NEEDLE_KEY in answer(s)
    s.close()


def test_compacting_media_leaves_text_cells_untouched(model, pixels):
    s, _, question = media_session(model, pixels[1], method="hybridkv", budget=0.25)
    s.append_text(question)
    before = s.cache.parse(s.state_blob()).blocks[0]
    text_pos = before.pos[s.cache.kind == 0]
    r = s.compact()
    assert r is not None and r.cells_after < r.cells_before
    after = s.cache.parse(s.state_blob()).blocks[0]
    for block in (before, after):
        assert len(set(block.pos.tolist())) == block.n_cells
    idx_b = {p: i for i, p in enumerate(before.pos.tolist())}
    idx_a = {p: i for i, p in enumerate(after.pos.tolist())}
    assert set(text_pos.tolist()) <= set(idx_a)
    for p in text_pos.tolist():
        for lb, la in zip(before.layers, after.layers):
            assert lb.k[idx_b[p]].tobytes() == la.k[idx_a[p]].tobytes()
            assert lb.v[idx_b[p]].tobytes() == la.v[idx_a[p]].tobytes()
    assert NEEDLE_KEY in answer(s)
    s.close()
