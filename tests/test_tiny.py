"""edgekv.testing.tiny: synthetic GGUF pairs checked against the real llama.cpp (llama-cpp-python 0.3.36, no mocks).

The low-level helpers below drive ``llama_cpp`` / ``llama_cpp.mtmd_cpp`` directly; they are test-local on
purpose (the real session lives in ``edgekv.runtime``). Every llama/mtmd object is freed through an
``ExitStack`` so long test runs do not leak.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before llama.cpp loads: OpenMP spinning is ~100x slower

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import io  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import llama_cpp as L  # noqa: E402
import llama_cpp.mtmd_cpp as M  # noqa: E402

from edgekv.testing import tiny  # noqa: E402

N_THREADS = 2
STATE_MAGIC = 0xAF143CD8

# ------------------------------------------------------------------------------------------------
# logging: collect llama.cpp / mtmd logs so failures can show them
# ------------------------------------------------------------------------------------------------

def _logs(n: int = 40) -> str:
    from edgekv.runtime.lib import LOG_LINES

    return "".join(list(LOG_LINES)[-n:])


@pytest.fixture(scope="module", autouse=True)
def _llama_backend():
    # edgekv's own init: llama.cpp and mtmd logs go to its ring buffer (and stay there for later tests)
    from edgekv.runtime import lib

    lib.init()
    yield


@pytest.fixture
def stack():
    with contextlib.ExitStack() as s:
        yield s


# ------------------------------------------------------------------------------------------------
# low-level helpers (test-local)
# ------------------------------------------------------------------------------------------------


def load_model(stack: contextlib.ExitStack, path: Path):
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama_model_load_from_file failed:\n{_logs()}"
    stack.callback(L.llama_model_free, model)
    return model


def init_mtmd(stack: contextlib.ExitStack, mmproj: Path, model):
    cp = M.mtmd_context_params_default()
    cp.use_gpu = False
    cp.n_threads = N_THREADS
    cp.print_timings = False
    mctx = M.mtmd_init_from_file(str(mmproj).encode(), model, cp)
    assert mctx, f"mtmd_init_from_file failed:\n{_logs()}"
    stack.callback(M.mtmd_free, mctx)
    return mctx


def new_context(stack: contextlib.ExitStack, model, n_ctx: int = 4096, n_batch: int = 512):
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = n_batch
    cp.n_threads = N_THREADS
    cp.n_threads_batch = N_THREADS
    ctx = L.llama_init_from_model(model, cp)
    assert ctx, f"llama_init_from_model failed:\n{_logs()}"
    stack.callback(L.llama_free, ctx)
    return ctx


def load_bitmap(stack: contextlib.ExitStack, mctx, data: bytes):
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    bmp = M.mtmd_helper_bitmap_init_from_buf(mctx, buf, len(data), False)
    assert bmp, f"mtmd_helper_bitmap_init_from_buf failed:\n{_logs()}"
    stack.callback(M.mtmd_bitmap_free, bmp)
    return bmp


def tokenize(stack: contextlib.ExitStack, mctx, prompt: str, bitmaps):
    text = prompt.encode()
    inp = M.mtmd_input_text(text, len(text), True, True)  # add_special, parse_special
    chunks = M.mtmd_input_chunks_init()
    stack.callback(M.mtmd_input_chunks_free, chunks)
    arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
    rc = M.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
    assert rc == 0, f"mtmd_tokenize rc={rc}:\n{_logs()}"
    return chunks


def chunk_list(chunks) -> list[dict]:
    out = []
    for i in range(M.mtmd_input_chunks_size(chunks)):
        c = M.mtmd_input_chunks_get(chunks, i)
        info = {
            "chunk": c,
            "type": M.mtmd_input_chunk_get_type(c),
            "n_tokens": M.mtmd_input_chunk_get_n_tokens(c),
            "n_pos": M.mtmd_input_chunk_get_n_pos(c),
        }
        if info["type"] == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            p = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
            info["tokens"] = [p[j] for j in range(n.value)]
        out.append(info)
    return out


def kv_cells(ctx, mrope: bool, seq_id: int = 0) -> list[tuple[int, int, int]]:
    """(pos, x, y) of every KV cell of ``seq_id``, parsed from llama_state_seq_get_data's meta section."""
    size = L.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    n = L.llama_state_seq_get_data(ctx, buf, size, seq_id)
    raw = memoryview(buf)[:n]
    magic, _sid, n_stream, n_cells = struct.unpack_from("<IiII", raw, 0)
    assert magic == STATE_MAGIC and n_stream == 1
    cells, off = [], 16
    for _ in range(n_cells):
        pos, n_seq = struct.unpack_from("<iI", raw, off)
        off += 8
        x = y = pos
        if mrope:  # llama_kv_cell_ext {i32 x, i32 y, i32 tok}
            x, y, _tok = struct.unpack_from("<iii", raw, off)
            off += 12
        off += 4 * n_seq
        cells.append((pos, x, y))
    return cells


def greedy(ctx, model, n_past: int, n: int, stack: contextlib.ExitStack) -> list[int]:
    """Decode ``n`` tokens greedily after a prefill whose last logits are available; explicit positions
    (M-RoPE: n_past is the next *logical* position, not pos_max + 1)."""
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(1, 0, 1)
    stack.callback(L.llama_batch_free, batch)
    out = []
    for i in range(n):
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), (n_vocab,))
        assert np.isfinite(logits).all()
        tok = int(np.argmax(logits))
        out.append(tok)
        batch.n_tokens = 1
        batch.token[0] = tok
        batch.pos[0] = n_past + i
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = True
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode rc={rc}:\n{_logs()}"
    return out


def decode_tokens(ctx, tokens: list[int], stack: contextlib.ExitStack, pos0: int = 0) -> None:
    batch = L.llama_batch_init(len(tokens), 0, 1)
    stack.callback(L.llama_batch_free, batch)
    for i, t in enumerate(tokens):
        batch.token[i] = t
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    batch.n_tokens = len(tokens)
    rc = L.llama_decode(ctx, batch)
    assert rc == 0, f"llama_decode rc={rc}:\n{_logs()}"


def llama_tokenize(model, text: str, add_special: bool = True) -> list[int]:
    vocab = L.llama_model_get_vocab(model)
    data = text.encode()
    buf = (L.llama_token * (len(data) + 8))()
    n = L.llama_tokenize(vocab, data, len(data), buf, len(buf), add_special, True)
    assert n >= 0
    return list(buf[:n])


def prompt_with_image(marker: str) -> str:
    return f"<|im_start|>user\n{marker}describe this image<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------------------------------------
# builder: files, determinism, metadata
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(tiny.VARIANTS))
def test_build_pair_is_small_fast_and_deterministic(tmp_path, variant):
    tiny.build_pair(variant, tmp_path / "warm")  # first call pays the imports
    t0 = time.perf_counter()
    a_txt, a_mm = tiny.build_pair(variant, tmp_path / "a", seed=0)
    dt = time.perf_counter() - t0
    b_txt, b_mm = tiny.build_pair(variant, tmp_path / "b", seed=0)
    c_txt, c_mm = tiny.build_pair(variant, tmp_path / "c", seed=1)

    assert a_txt.name == f"{variant}.gguf" and a_mm.name == f"{variant}-mmproj.gguf"
    assert dt < 0.5, f"build took {dt:.3f}s"
    for p in (a_txt, a_mm):
        assert p.stat().st_size < 2_000_000
    assert a_txt.read_bytes() == b_txt.read_bytes()
    assert a_mm.read_bytes() == b_mm.read_bytes()
    assert a_txt.read_bytes() != c_txt.read_bytes()
    assert a_mm.read_bytes() != c_mm.read_bytes()
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.parametrize("variant", sorted(tiny.VARIANTS))
def test_build_pair_metadata(tmp_path, variant):
    from gguf import GGUFReader

    info = tiny.VARIANTS[variant]
    txt, mm = tiny.build_pair(variant, tmp_path)

    def field(r, key):
        f = r.fields[key]
        if f.types[0].name == "STRING":
            return bytes(f.parts[f.data[0]]).decode()
        if f.types[0].name == "ARRAY":
            return [f.parts[i].tolist()[0] for i in f.data]
        return f.parts[f.data[0]].tolist()[0]

    rt = GGUFReader(txt)
    assert field(rt, "general.architecture") == info["text_arch"]
    assert field(rt, f"{info['text_arch']}.embedding_length") == info["n_embd"]
    assert field(rt, f"{info['text_arch']}.context_length") >= 8192
    types = field(rt, "tokenizer.ggml.token_type")
    assert 300 <= len(types) <= 512
    assert types.count(6) == 256 and types.count(3) >= 4
    assert "<|im_start|>" in field(rt, "tokenizer.chat_template")
    if info["mrope"]:
        secs = field(rt, "qwen2vl.rope.dimension_sections")
        assert len(secs) == 4 and sum(secs) <= info["head_dim"] // 2

    rv = GGUFReader(mm)
    assert field(rv, "general.architecture") == "clip"
    assert field(rv, "clip.projector_type") == info["projector"]
    has_pinpoints = "clip.vision.image_grid_pinpoints" in rv.fields
    assert has_pinpoints == (variant == "llava-tiles")
    if has_pinpoints:  # tiles must be multiples of image_size, or mtmd_tokenize aborts the process
        assert all(v % info["image_size"] == 0 for v in field(rv, "clip.vision.image_grid_pinpoints"))


def test_tiny_vocab():
    v = tiny.tiny_vocab()
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert v.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert v.types[v.im_start] == 3 and v.types[v.im_end] == 3 and v.eos == v.im_end
    assert len(set(v.tokens)) == len(v.tokens) == v.n_vocab
    assert tiny.tiny_vocab(1000).n_vocab == 1000
    with pytest.raises(ValueError):
        tiny.tiny_vocab(100)


def test_make_test_image_deterministic():
    from PIL import Image

    a = tiny.make_test_image(64, 48, seed=3)
    assert a == tiny.make_test_image(64, 48, seed=3)
    assert a != tiny.make_test_image(64, 48, seed=4)
    im = Image.open(io.BytesIO(a))
    assert im.size == (64, 48) and im.mode == "RGB"


def test_build_pair_rejects_unknown_variant(tmp_path):
    with pytest.raises(ValueError):
        tiny.build_pair("nope", tmp_path)


# ------------------------------------------------------------------------------------------------
# end to end through llama.cpp + libmtmd
# ------------------------------------------------------------------------------------------------


def test_tokenizer_and_chat_template(tmp_path, stack):
    txt, _ = tiny.build_pair("llava", tmp_path)
    model = load_model(stack, txt)
    v = tiny.tiny_vocab()
    toks = llama_tokenize(model, "<|im_start|>user\nwhat is this image<|im_end|>")
    assert toks[0] == v.bos and toks[1] == v.im_start and toks[-1] == v.im_end
    words = [v.tokens[t] for t in toks]
    for w in ("\u2581is", "\u2581this", "\u2581image"):
        assert w in words  # whole-word pieces, not byte fallback
    assert words[4:8] == ["w", "h", "a", "t"]  # after "\n" there is no "\u2581": single letters
    # arbitrary UTF-8 falls back to byte tokens
    assert all(v.types[t] == 6 for t in llama_tokenize(model, "\u00e9\u00e8", add_special=False)[1:])

    vocab = L.llama_model_get_vocab(model)
    assert L.llama_vocab_eos(vocab) == v.im_end and L.llama_vocab_is_eog(vocab, v.im_end)
    tmpl = L.llama_model_chat_template(model, None)
    assert tmpl and b"<|im_start|>" in tmpl
    msgs = (L.llama_chat_message * 1)(L.llama_chat_message(b"user", b"hi"))
    buf = ctypes.create_string_buffer(256)
    n = L.llama_chat_apply_template(tmpl, msgs, 1, True, buf, len(buf))
    assert buf.raw[:n] == b"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("variant", sorted(tiny.VARIANTS))
def test_variant_end_to_end(tmp_path, stack, variant):
    info = tiny.VARIANTS[variant]
    txt, mm = tiny.build_pair(variant, tmp_path)
    model = load_model(stack, txt)
    assert L.llama_model_n_embd(model) == info["n_embd"]
    assert L.llama_model_n_ctx_train(model) == info["n_ctx"]
    mctx = init_mtmd(stack, mm, model)
    assert M.mtmd_support_vision(mctx)
    assert M.mtmd_decode_use_mrope(mctx) == info["mrope"]

    w, h = info["test_image"]
    bmp = load_bitmap(stack, mctx, tiny.make_test_image(w, h, seed=0))
    assert (M.mtmd_bitmap_get_nx(bmp), M.mtmd_bitmap_get_ny(bmp)) == (w, h)
    marker = M.mtmd_default_marker().decode()
    chunks = tokenize(stack, mctx, prompt_with_image(marker), [bmp])
    cl = chunk_list(chunks)
    images = [c for c in cl if c["type"] == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    texts = [c for c in cl if c["type"] == M.MTMD_INPUT_CHUNK_TYPE_TEXT]
    assert len(images) == info["test_image_chunks"]
    assert sum(c["n_tokens"] for c in images) == info["test_image_tokens"]
    assert all(c["n_tokens"] == 256 for c in images)
    if info["mrope"]:
        # M-RoPE: 256 image tokens advance the position by only max(grid_w, grid_h) = 16
        assert [c["n_pos"] for c in images] == [info["test_image_positions"]]
        it = M.mtmd_input_chunk_get_tokens_image(images[0]["chunk"])
        assert (M.mtmd_image_tokens_get_nx(it), M.mtmd_image_tokens_get_ny(it)) == (16, 16)
    else:
        assert all(c["n_pos"] == c["n_tokens"] for c in images)
    assert cl[0]["tokens"][:2] == [1, tiny.tiny_vocab().im_start]  # <s> <|im_start|>

    n_tokens = M.mtmd_helper_get_n_tokens(chunks)
    n_pos = M.mtmd_helper_get_n_pos(chunks)
    assert n_tokens == sum(c["n_tokens"] for c in cl)
    assert (n_pos < n_tokens) == info["mrope"]

    ctx = new_context(stack, model, n_ctx=4096)
    new_n_past = L.llama_pos(0)
    rc = M.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(new_n_past))
    assert rc == 0, _logs()
    assert new_n_past.value == n_pos

    mem = L.llama_get_memory(ctx)
    cells = kv_cells(ctx, info["mrope"])
    assert len(cells) == n_tokens  # one KV cell per token, image tokens included
    assert L.llama_memory_seq_pos_min(mem, 0) == 0
    assert L.llama_memory_seq_pos_max(mem, 0) == n_pos - 1
    assert L.llama_memory_can_shift(mem) == (not info["mrope"])
    if info["mrope"]:
        p0 = texts[0]["n_tokens"]  # the image starts right after the first text chunk
        img = cells[p0:p0 + 256]
        assert {c[0] for c in img} == {p0}  # one temporal position for the whole still image
        assert {c[1] for c in img} == set(range(p0, p0 + 16))  # x = p0 + column
        assert {c[2] for c in img} == set(range(p0, p0 + 16))  # y = p0 + row
    else:
        assert [c[0] for c in cells] == list(range(n_tokens))

    size_before = L.llama_state_seq_get_size(ctx, 0)
    gen = greedy(ctx, model, n_pos, 8, stack)
    assert all(0 <= t < tiny.tiny_vocab().n_vocab for t in gen)
    assert len(set(gen)) >= 3, gen  # random weights still give varied tokens
    assert len(kv_cells(ctx, info["mrope"])) == n_tokens + 8
    assert L.llama_memory_seq_pos_max(mem, 0) == n_pos + 7
    assert L.llama_state_seq_get_size(ctx, 0) > size_before


def test_qwen2vl_dynamic_resolution_token_counts(tmp_path, stack):
    txt, mm = tiny.build_pair("qwen2vl", tmp_path)
    model = load_model(stack, txt)
    mctx = init_mtmd(stack, mm, model)
    marker = M.mtmd_default_marker().decode()
    for w, h in [(448, 448), (896, 896), (300, 200), (1000, 500)]:
        with contextlib.ExitStack() as s:
            bmp = load_bitmap(s, mctx, tiny.make_test_image(w, h))
            cl = chunk_list(tokenize(s, mctx, f"a{marker}b", [bmp]))
            (img,) = [c for c in cl if c["type"] == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            it = M.mtmd_input_chunk_get_tokens_image(img["chunk"])
            nx, ny = M.mtmd_image_tokens_get_nx(it), M.mtmd_image_tokens_get_ny(it)
            assert img["n_tokens"] == nx * ny == tiny.qwen2vl_tokens(w, h)
            assert img["n_pos"] == max(nx, ny)


def test_llava_tiles_follow_best_pinpoint(tmp_path, stack):
    txt, mm = tiny.build_pair("llava-tiles", tmp_path)
    model = load_model(stack, txt)
    mctx = init_mtmd(stack, mm, model)
    marker = M.mtmd_default_marker().decode()
    # 1000x300 -> 672x224 pinpoint: 3 tiles + overview; small images -> single view
    for (w, h), n_chunks in [((1000, 300), 4), ((672, 672), 10), ((100, 100), 1)]:
        with contextlib.ExitStack() as s:
            bmp = load_bitmap(s, mctx, tiny.make_test_image(w, h))
            cl = chunk_list(tokenize(s, mctx, f"a{marker}b", [bmp]))
            images = [c for c in cl if c["type"] == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            assert len(images) == n_chunks
            assert all(c["n_tokens"] == 256 for c in images)


@pytest.mark.parametrize("variant", ["llava", "qwen2vl"])
def test_per_chunk_encode_and_decode(tmp_path, stack, variant):
    """The manual path: text chunks via llama_decode, image chunks via mtmd_encode_chunk +
    mtmd_helper_decode_image_chunk (which needs a CFUNCTYPE callback, never None)."""
    info = tiny.VARIANTS[variant]
    txt, mm = tiny.build_pair(variant, tmp_path)
    model = load_model(stack, txt)
    mctx = init_mtmd(stack, mm, model)
    w, h = info["test_image"]
    bmp = load_bitmap(stack, mctx, tiny.make_test_image(w, h))
    chunks = tokenize(stack, mctx, prompt_with_image(M.mtmd_default_marker().decode()), [bmp])
    ctx = new_context(stack, model)

    seen = []

    @M.mtmd_helper_post_decode_callback
    def on_batch(batch_p, user_data):
        b = batch_p.contents
        seen.append((b.n_tokens, b.n_embd, b.n_pos))
        return 0

    n_past = 0
    for c in chunk_list(chunks):
        if c["type"] == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            decode_tokens(ctx, c["tokens"], stack, pos0=n_past)
            n_past += c["n_tokens"]
            continue
        assert M.mtmd_encode_chunk(mctx, c["chunk"]) == 0
        embd = M.mtmd_get_output_embd(mctx)
        new_n_past = L.llama_pos(0)
        with pytest.raises(ctypes.ArgumentError):  # None is not accepted for the callback
            M.mtmd_helper_decode_image_chunk(mctx, ctx, c["chunk"], embd, n_past, 0, 64,
                                             ctypes.byref(new_n_past), None, None)
        rc = M.mtmd_helper_decode_image_chunk(mctx, ctx, c["chunk"], embd, n_past, 0, 64,
                                              ctypes.byref(new_n_past), on_batch, None)
        assert rc == 0, _logs()
        assert new_n_past.value == n_past + c["n_pos"]
        n_past = new_n_past.value
    # 256 image tokens decoded in sub-batches of n_batch=64, M-RoPE batches carry 4 position sections
    assert seen == [(64, info["n_embd"], 4 if info["mrope"] else 1)] * 4
    assert n_past == M.mtmd_helper_get_n_pos(chunks)
    assert len(kv_cells(ctx, info["mrope"])) == M.mtmd_helper_get_n_tokens(chunks)
    assert len(greedy(ctx, model, n_past, 3, stack)) == 3


def test_null_post_decode_callback_is_accepted(tmp_path, stack):
    txt, mm = tiny.build_pair("llava", tmp_path)
    model = load_model(stack, txt)
    mctx = init_mtmd(stack, mm, model)
    bmp = load_bitmap(stack, mctx, tiny.make_test_image(224, 224))
    chunks = tokenize(stack, mctx, M.mtmd_default_marker().decode(), [bmp])
    (img,) = [c for c in chunk_list(chunks) if c["type"] == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    ctx = new_context(stack, model)
    assert M.mtmd_encode_chunk(mctx, img["chunk"]) == 0
    new_n_past = L.llama_pos(0)
    rc = M.mtmd_helper_decode_image_chunk(mctx, ctx, img["chunk"], M.mtmd_get_output_embd(mctx), 0, 0, 512,
                                          ctypes.byref(new_n_past), M.mtmd_helper_post_decode_callback(), None)
    assert rc == 0 and new_n_past.value == 256
    assert L.llama_memory_seq_pos_max(L.llama_get_memory(ctx), 0) == 255


# ------------------------------------------------------------------------------------------------
# build_text_model
# ------------------------------------------------------------------------------------------------

_SMALL = dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=256, n_ctx=8192)


@pytest.mark.parametrize(
    "arch,weight_type,quant_method",
    [
        ("llama", "q8_0", "exact"),
        ("llama", "q8_0", "random"),
        ("llama", "q4_0", "random"),
        ("llama", "f16", "auto"),
        ("qwen2vl", "q8_0", "auto"),
    ],
)
def test_build_text_model_loads_and_decodes(tmp_path, stack, arch, weight_type, quant_method):
    path = tiny.build_text_model(tmp_path / "m.gguf", arch=arch, weight_type=weight_type,
                                 quant_method=quant_method, n_vocab=1024, seed=5, **_SMALL)
    again = tiny.build_text_model(tmp_path / "m2.gguf", arch=arch, weight_type=weight_type,
                                  quant_method=quant_method, n_vocab=1024, seed=5, **_SMALL)
    assert path.read_bytes() == again.read_bytes()

    model = load_model(stack, path)
    assert L.llama_model_n_layer(model) == _SMALL["n_layer"]
    assert L.llama_model_n_embd(model) == _SMALL["n_embd"]
    assert L.llama_model_n_head(model) == _SMALL["n_head"]
    assert L.llama_model_n_head_kv(model) == _SMALL["n_head_kv"]
    assert L.llama_model_n_ctx_train(model) == _SMALL["n_ctx"]
    assert L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)) == 1024
    ftype = ctypes.create_string_buffer(64)
    L.llama_model_meta_val_str(model, b"general.file_type", ftype, 64)
    assert int(ftype.value) == {"q8_0": 7, "q4_0": 2, "f16": 1}[weight_type]

    ctx = new_context(stack, model, n_ctx=512)
    prompt = llama_tokenize(model, "<|im_start|>user\ndescribe the picture<|im_end|>")
    decode_tokens(ctx, prompt, stack)
    gen = greedy(ctx, model, len(prompt), 4, stack)
    assert all(0 <= t < 1024 for t in gen)
    mrope = arch == "qwen2vl"
    assert len(kv_cells(ctx, mrope)) == len(prompt) + 4
    # K and V rows are f16: 2 layers * 2 (K,V) * n_head_kv * head_dim * 2 bytes per cell
    cell_bytes = 2 * 2 * _SMALL["n_head_kv"] * _SMALL["head_dim"] * 2
    meta = 4 + 4 + 4 + (12 if mrope else 0)
    n = len(prompt) + 4
    assert L.llama_state_seq_get_size(ctx, 0) >= n * (cell_bytes + meta)


def test_build_text_model_validates(tmp_path):
    with pytest.raises(ValueError):
        tiny.build_text_model(tmp_path / "x.gguf", weight_type="q5_k", **_SMALL)
    with pytest.raises(ValueError):  # qwen2vl needs n_head * head_dim == n_embd
        tiny.build_text_model(tmp_path / "x.gguf", arch="qwen2vl", **{**_SMALL, "head_dim": 16})
    with pytest.raises(ValueError):  # q8_0 rows must be whole 32-value blocks
        tiny.build_text_model(tmp_path / "x.gguf", **{**_SMALL, "n_ff": 200})
    assert not (tmp_path / "x.gguf").exists()


def test_real_shapes_are_consistent():
    for name, s in tiny.REAL_SHAPES.items():
        assert s["n_head"] % s["n_head_kv"] == 0, name
        if s["arch"] == "qwen2vl":
            assert s["n_head"] * s["head_dim"] == s["n_embd"], name
