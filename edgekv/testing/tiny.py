"""Deterministic synthetic GGUF models for tests, demos and benchmarks.

No real vision-language weights are available offline, so everything multimodal in the test-suite runs on
tiny synthetic pairs (text model + mmproj) that llama.cpp's ``libmtmd`` loads like real ones. Weights are
random (``np.random.default_rng(seed)``), so outputs are meaningless, but every code path -- tokenizer,
chat template, image preprocessing, vision encoder, projector, M-RoPE positions, KV cache -- is the real
llama.cpp one.

Public API
----------
``build_pair(variant, out_dir, seed=0) -> (text_path, mmproj_path)``
    Writes ``<variant>.gguf`` and ``<variant>-mmproj.gguf`` (each < 1 MB, ~10-40 ms, byte-identical for a
    given seed). Variants (see ``VARIANTS`` for the numbers tests check):

    * ``"llava"``       -- llama text model + ``clip.projector_type = "mlp"`` (LLaVA-1.5 style),
      image_size 224, patch 14: every image becomes one chunk of 256 tokens.
    * ``"llava-tiles"`` -- the same plus ``clip.vision.image_grid_pinpoints`` (LLaVA-1.6 style "anyres"):
      a large image becomes one 256-token chunk per 224x224 tile plus an overview chunk
      (672x672 -> 3x3 tiles + overview = 10 chunks, 2560 tokens).
    * ``"qwen2vl"``     -- ``general.architecture = "qwen2vl"`` text model (M-RoPE) + ``qwen2vl_merger``
      projector (dynamic resolution): (H/28)*(W/28) tokens, 448x448 -> 256 tokens on 16 positions.

``build_text_model(path, *, n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, ...) -> Path``
    A text-only model with the *shapes* of a real one (e.g. ``REAL_SHAPES["qwen2-vl-2b"]``) and random
    weights, streamed to disk one chunk at a time (a 1.5B q8_0 model is ~1.6 GB on disk, < 100 MB of RAM
    while building). Its decode cost equals the real model's, which is all the speed benchmark needs.

``make_test_image(width, height, seed=0) -> bytes``
    A deterministic PNG (gradient + coloured rectangles) for tests and demos.

``qwen2vl_tokens(width, height) -> int``
    Expected image tokens of the tiny qwen2vl pair for an image size.

``tiny_vocab(n_vocab=None)``
    The shared ~400-token SentencePiece-style vocabulary (``<unk> <s> </s>``, 256 byte tokens, ChatML and
    Qwen-VL control tokens, a few word pieces).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "VARIANTS",
    "REAL_SHAPES",
    "CHATML_TEMPLATE",
    "build_pair",
    "build_text_model",
    "make_test_image",
    "qwen2vl_tokens",
    "tiny_vocab",
    "TinyVocab",
]

# --------------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 6 byte
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_BYTE = 1, 2, 3, 6

_CONTROL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    # the strings libmtmd wraps Qwen2-VL images with; as control tokens they stay one token each
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)

# word pieces: SentencePiece (llama tokenizer) merges adjacent symbols only when the merged string is
# in the vocabulary, so every word is added with its whole prefix chain ("▁t", "▁th", "▁the").
_WORDS = (
    "the", "a", "is", "of", "and", "in", "to", "this", "what", "image", "describe", "picture",
    "cat", "dog", "red", "blue", "green", "user", "assistant", "system", "you", "are", "it",
    "there", "shows", "color", "video", "frame", "text", "yes", "no", "one", "two",
)
_SPACE = "\u2581"  # SentencePiece's "▁"


@dataclass(frozen=True)
class TinyVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk: int
    bos: int
    eos: int
    im_start: int
    im_end: int

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def tiny_vocab(n_vocab: int | None = None) -> TinyVocab:
    """The shared tiny vocabulary; padded with unreachable ``▁tokN`` pieces up to ``n_vocab``."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [_TT_UNKNOWN, _TT_CONTROL, _TT_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_TT_BYTE] * 256
    tokens += list(_CONTROL_TOKENS)
    types += [_TT_CONTROL] * len(_CONTROL_TOKENS)
    n_special = len(tokens)

    pieces: list[str] = [_SPACE] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    seen = set(pieces)
    for w in _WORDS:
        s = _SPACE + w
        for i in range(2, len(s) + 1):
            p = s[:i]
            if p not in seen:
                seen.add(p)
                pieces.append(p)
    tokens += pieces
    types += [_TT_NORMAL] * len(pieces)
    if n_vocab is not None:
        if n_vocab < len(tokens):
            raise ValueError(f"n_vocab must be >= {len(tokens)} (the base tiny vocabulary)")
        extra = n_vocab - len(tokens)
        tokens += [f"{_SPACE}tok{i}" for i in range(extra)]
        types += [_TT_NORMAL] * extra
    # SPM merges the highest-scoring pair first: longer pieces score higher so whole words win.
    scores = [0.0] * n_special + [float(len(t)) - i * 1e-4 for i, t in enumerate(tokens[n_special:])]
    return TinyVocab(
        tokens=tokens, scores=scores, types=types, unk=0, bos=1, eos=tokens.index("<|im_end|>"),
        im_start=tokens.index("<|im_start|>"), im_end=tokens.index("<|im_end|>"),
    )


# --------------------------------------------------------------------------------------------------
# streaming GGUF writer
# --------------------------------------------------------------------------------------------------

_CHUNK_ELEMS = 1 << 22  # elements generated per chunk (16 MB of float32) when streaming big tensors


@dataclass(frozen=True)
class _Tensor:
    """One tensor to write. ``shape`` is numpy order (ggml order reversed: [ne1, ne0])."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # "f32" | "f16" | "q8_0" | "q4_0"
    init: str = "normal"  # "normal" | "ones" | "zeros"
    scale: float = 0.02


def _ggml_type(qtype: str):
    from gguf import GGMLQuantizationType as T

    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]


def _nbytes(t: _Tensor) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    n = int(np.prod(t.shape))
    block, tsize = GGML_QUANT_SIZES[_ggml_type(t.qtype)]
    return n // block * tsize


def _chunks(t: _Tensor, rng: np.random.Generator, quant_method: str) -> Iterator[np.ndarray]:
    """Yield the tensor's bytes (as arrays) in row chunks, in file order."""
    from gguf.quants import quantize

    cols = t.shape[-1]
    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    step = max(1, _CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        nr = min(step, rows - r0)
        if t.init == "ones":
            x = np.ones((nr, cols), dtype=np.float32)
        elif t.init == "zeros":
            x = np.zeros((nr, cols), dtype=np.float32)
        elif quant_method == "random" and t.qtype in ("f32", "f16") and nr * cols >= 1 << 20:
            yield _random_floats(t.qtype, (nr, cols), t.scale, rng)
            continue
        elif quant_method == "random" and t.qtype not in ("f32", "f16"):
            yield _random_blocks(t.qtype, nr * cols, t.scale, rng)
            continue
        else:
            x = rng.standard_normal((nr, cols), dtype=np.float32)
            x *= np.float32(t.scale)
        if t.qtype == "f32":
            yield x
        elif t.qtype == "f16":
            yield x.astype(np.float16)
        else:
            yield quantize(x, _ggml_type(t.qtype))


def _random_floats(qtype: str, shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Fast N(0, scale^2)-like floats for big f16/f32 tensors: 65536 normal samples drawn once per call,
    indexed by random uint16s (~5x faster than sampling every value; the cost for llama.cpp is the same)."""
    table = rng.standard_normal(65536, dtype=np.float32) * np.float32(scale)
    table = table.astype(np.float16 if qtype == "f16" else np.float32)
    return table[rng.integers(0, 65536, size=shape, dtype=np.uint16)]


def _random_blocks(qtype: str, n: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Random but valid q8_0 / q4_0 blocks whose dequantized values have std ~= ``scale``.

    Used instead of ``gguf.quants.quantize`` for big models: the block layout (f16 scale ``d`` then the
    quants) is exactly what llama.cpp reads, so matmul cost is identical to real weights, and it is
    ~5x faster than normal-sampling + quantizing. Every block shares one f16 scale ``d``.
    q8_0 block = d (f16) + 32 x int8 (uniform in [-127, 127], std 73.6; -128 is avoided because some
    SIMD dot products use sign tricks that overflow on it).
    q4_0 block = d (f16) + 16 bytes of nibbles (value = (nibble - 8) * d, std 4.61).
    """
    if qtype == "q8_0":
        nb = n // 32
        out = np.empty((nb, 34), dtype=np.uint8)
        d = np.float16(scale / 73.6)
        out[:, 2:] = rng.integers(-127, 128, size=(nb, 32), dtype=np.int8).view(np.uint8)
    elif qtype == "q4_0":
        nb = n // 32
        out = np.empty((nb, 18), dtype=np.uint8)
        d = np.float16(scale / 4.61)
        out[:, 2:] = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
    else:  # pragma: no cover - guarded by callers
        raise ValueError(qtype)
    out[:, :2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    return out


def _write_gguf(
    path: Path,
    arch: str,
    add_kv: Callable[[Any], None],
    tensors: Sequence[_Tensor],
    rng: np.random.Generator,
    quant_method: str = "exact",
) -> Path:
    """Write header, metadata and tensor infos with ``gguf.GGUFWriter``, then stream the data."""
    import logging

    from gguf import GGUFWriter

    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(path, arch)
    add_kv(w)
    for t in tensors:
        nb = _nbytes(t)
        if t.qtype == "f32":
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nb)
        elif t.qtype == "f16":
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float16), nb)
        else:
            from gguf.quants import quant_shape_to_byte_shape

            byte_shape = quant_shape_to_byte_shape(t.shape, _ggml_type(t.qtype))
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nb, raw_dtype=_ggml_type(t.qtype))
    tmp = path.with_name(path.name + ".part")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())
        for t in tensors:
            written = 0
            for chunk in _chunks(t, rng, quant_method):
                chunk = np.ascontiguousarray(chunk)
                fout.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
            if written != _nbytes(t):  # pragma: no cover - internal consistency
                raise AssertionError(f"{t.name}: wrote {written} bytes, expected {_nbytes(t)}")
            w.write_padding(fout, written)
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------------------
# text models
# --------------------------------------------------------------------------------------------------

_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # gguf.LlamaFileType


def _text_kv_and_tensors(
    *,
    arch: str,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    n_ff: int,
    vocab: TinyVocab,
    n_ctx: int,
    weight_type: str,
    rope_freq_base: float,
    rope_sections: Sequence[int] | None,
    tie_embeddings: bool,
    qkv_bias: bool,
    name: str,
    scales: dict[str, float],
) -> tuple[Callable, list[_Tensor]]:
    if arch not in ("llama", "qwen2vl"):
        raise ValueError(f"arch must be 'llama' or 'qwen2vl', got {arch!r}")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if arch == "qwen2vl":
        if n_head * head_dim != n_embd:
            raise ValueError("qwen2vl needs n_head * head_dim == n_embd (llama.cpp's qwen2vl loader)")
        if rope_sections is None:
            # Qwen2-VL uses [16, 24, 24, 0] for head_dim 128; scale to head_dim/2 rotary pairs
            half = head_dim // 2
            t = half // 4
            rope_sections = [t, (half - t) // 2, half - t - (half - t) // 2, 0]
        if len(rope_sections) != 4 or sum(rope_sections) > head_dim // 2:
            raise ValueError("rope_sections must be 4 ints with sum <= head_dim/2")
    if weight_type in ("q8_0", "q4_0"):
        for dim, what in ((n_embd, "n_embd"), (n_ff, "n_ff"), (n_head * head_dim, "n_head*head_dim")):
            if dim % 32:
                raise ValueError(f"{what}={dim} must be a multiple of 32 for {weight_type}")

    wt = weight_type
    E, V, F = n_embd, vocab.n_vocab, n_ff
    Q, KV = n_head * head_dim, n_head_kv * head_dim

    def add_kv(w) -> None:
        w.add_name(name)
        w.add_file_type(_FILE_TYPE[wt])
        w.add_context_length(n_ctx)
        w.add_embedding_length(E)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(F)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(rope_freq_base)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_vocab_size(V)
        if rope_sections is not None:
            w.add_rope_dimension_sections([int(s) for s in rope_sections])
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
        w.add_unk_token_id(vocab.unk)
        w.add_bos_token_id(vocab.bos)
        w.add_eos_token_id(vocab.eos)
        w.add_pad_token_id(vocab.unk)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHATML_TEMPLATE)
        w.add_quantization_version(2)

    s = scales
    tensors = [_Tensor("token_embd.weight", (V, E), wt, scale=s["embd"])]
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors += [
            _Tensor(b + "attn_norm.weight", (E,), "f32", "ones"),
            _Tensor(b + "attn_q.weight", (Q, E), wt, scale=s["qk"]),
            _Tensor(b + "attn_k.weight", (KV, E), wt, scale=s["qk"]),
            _Tensor(b + "attn_v.weight", (KV, E), wt, scale=s["w"]),
        ]
        if qkv_bias:
            tensors += [
                _Tensor(b + "attn_q.bias", (Q,), "f32", scale=s["bias"]),
                _Tensor(b + "attn_k.bias", (KV,), "f32", scale=s["bias"]),
                _Tensor(b + "attn_v.bias", (KV,), "f32", scale=s["bias"]),
            ]
        tensors += [
            _Tensor(b + "attn_output.weight", (E, Q), wt, scale=s["w"]),
            _Tensor(b + "ffn_norm.weight", (E,), "f32", "ones"),
            _Tensor(b + "ffn_gate.weight", (F, E), wt, scale=s["w"]),
            _Tensor(b + "ffn_up.weight", (F, E), wt, scale=s["w"]),
            _Tensor(b + "ffn_down.weight", (E, F), wt, scale=s["w"]),
        ]
    tensors.append(_Tensor("output_norm.weight", (E,), "f32", "ones"))
    if not tie_embeddings:
        tensors.append(_Tensor("output.weight", (V, E), wt, scale=s["out"]))
    return add_kv, tensors


# Text hyper-parameters shared by the tiny multimodal pairs.
_TINY_TEXT = dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=256, n_ctx=32768)
# Weight scales: q/k large enough that attention is clearly non-uniform, output large enough that greedy
# decoding is not stuck on one token.
_TINY_SCALES = {"embd": 1.0, "qk": 0.15, "w": 0.08, "bias": 0.02, "out": 0.25}
_REAL_SCALES = {"embd": 0.02, "qk": 0.02, "w": 0.02, "bias": 0.02, "out": 0.02}

# Shapes of real text models (from their config.json) for build_text_model(**REAL_SHAPES[name]).
REAL_SHAPES: dict[str, dict] = {
    "qwen2-vl-2b": dict(arch="qwen2vl", n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, head_dim=128,
                        n_ff=8960, n_vocab=151936, rope_freq_base=1e6, tie_embeddings=True),
    "llama-3.2-1b": dict(arch="llama", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64,
                         n_ff=8192, n_vocab=128256, rope_freq_base=5e5, tie_embeddings=True),
    "llama-3.2-3b": dict(arch="llama", n_layer=28, n_embd=3072, n_head=24, n_head_kv=8, head_dim=128,
                         n_ff=8192, n_vocab=128256, rope_freq_base=5e5, tie_embeddings=True),
}


def build_text_model(
    path: str | os.PathLike,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    head_dim: int,
    n_ff: int,
    n_vocab: int | None = None,
    n_ctx: int = 32768,
    weight_type: str = "q8_0",
    seed: int = 0,
    arch: str = "llama",
    rope_freq_base: float | None = None,
    rope_sections: Sequence[int] | None = None,
    tie_embeddings: bool = True,
    qkv_bias: bool | None = None,
    quant_method: str = "auto",
    weight_scale: float | None = None,
) -> Path:
    """Write a synthetic text-only model with the given shapes and random weights; return its path.

    ``weight_type``: ``"q8_0"``, ``"q4_0"``, ``"f16"`` or ``"f32"`` for every 2-D weight (norms and biases
    are f32, as in real GGUFs). ``arch="qwen2vl"`` gives the Qwen2-VL text model (M-RoPE,
    ``rope_sections`` defaulting to Qwen2-VL's proportions; q/k/v biases on by default).
    ``n_vocab`` defaults to the ~400-token tiny vocabulary; larger values pad it with unreachable pieces
    so the embedding/output matrices have the real size.

    ``quant_method``: ``"exact"`` samples N(0, scale^2) and quantizes with ``gguf.quants.quantize``;
    ``"random"`` writes random q8_0/q4_0 blocks directly (same cost for llama.cpp, 3-4x faster to build)
    and draws f16/f32 weights from a per-chunk table of 65536 normal samples; ``"auto"`` (default) is
    exact below 64M parameters and random above. Tensors are generated and written in chunks of 4M elements, so RAM stays ~100 MB whatever
    the model size. The file is byte-identical for the same arguments and seed.
    """
    if weight_type not in ("q8_0", "q4_0", "f16", "f32"):
        raise ValueError(f"weight_type must be q8_0, q4_0, f16 or f32, got {weight_type!r}")
    if quant_method not in ("auto", "exact", "random"):
        raise ValueError("quant_method must be 'auto', 'exact' or 'random'")
    vocab = tiny_vocab(n_vocab)
    if rope_freq_base is None:
        rope_freq_base = 1e6 if arch == "qwen2vl" else 5e5
    if qkv_bias is None:
        qkv_bias = arch == "qwen2vl"
    scales = dict(_REAL_SCALES)
    if weight_scale is not None:
        scales = {k: float(weight_scale) for k in scales}
    add_kv, tensors = _text_kv_and_tensors(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_ff=n_ff, vocab=vocab, n_ctx=n_ctx, weight_type=weight_type,
        rope_freq_base=rope_freq_base, rope_sections=rope_sections, tie_embeddings=tie_embeddings,
        qkv_bias=qkv_bias, name=f"edgekv-synthetic-{arch}-{n_layer}L-{n_embd}", scales=scales,
    )
    if quant_method == "auto":
        n_params = sum(int(np.prod(t.shape)) for t in tensors)
        quant_method = "exact" if n_params <= 64_000_000 else "random"
    rng = np.random.default_rng(seed)
    return _write_gguf(Path(path), arch, add_kv, tensors, rng, quant_method)


# --------------------------------------------------------------------------------------------------
# mmproj (vision encoder + projector)
# --------------------------------------------------------------------------------------------------

_V_EMBD, _V_HEAD, _V_FF, _V_LAYERS = 32, 2, 48, 2  # vision tower: keep n_ff != n_embd (loader heuristic)
_MM_HIDDEN = 64  # hidden width of the llava mlp projector
_V_SCALE = 0.05


def _vision_common_kv(w, *, projector: str, image_size: int, patch_size: int, proj_dim: int, name: str):
    w.add_name(name)
    w.add_file_type(0)
    w.add_string("clip.projector_type", projector)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_llava_projector", projector == "mlp")
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.embedding_length", _V_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", _V_FF)
    w.add_uint32("clip.vision.block_count", _V_LAYERS)
    w.add_uint32("clip.vision.attention.head_count", _V_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.projection_dim", proj_dim)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])


def _vision_blocks(prefix: str = "v") -> list[_Tensor]:
    D, F = _V_EMBD, _V_FF
    out: list[_Tensor] = []
    for i in range(_V_LAYERS):
        b = f"{prefix}.blk.{i}."
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):
            out += [_Tensor(b + n + ".weight", (D, D), "f32", scale=_V_SCALE),
                    _Tensor(b + n + ".bias", (D,), "f32", scale=_V_SCALE)]
        out += [
            _Tensor(b + "ln1.weight", (D,), "f32", "ones"),
            _Tensor(b + "ln1.bias", (D,), "f32", "zeros"),
            _Tensor(b + "ffn_up.weight", (F, D), "f32", scale=_V_SCALE),
            _Tensor(b + "ffn_up.bias", (F,), "f32", scale=_V_SCALE),
            _Tensor(b + "ffn_down.weight", (D, F), "f32", scale=_V_SCALE),
            _Tensor(b + "ffn_down.bias", (D,), "f32", scale=_V_SCALE),
            _Tensor(b + "ln2.weight", (D,), "f32", "ones"),
            _Tensor(b + "ln2.bias", (D,), "f32", "zeros"),
        ]
    return out


def _llava_mmproj(n_embd_text: int, pinpoints: Sequence[int] | None, name: str):
    image_size, patch = 224, 14
    D = _V_EMBD
    n_patches = (image_size // patch) ** 2

    def add_kv(w) -> None:
        _vision_common_kv(w, projector="mlp", image_size=image_size, patch_size=patch,
                          proj_dim=n_embd_text, name=name)
        if pinpoints:
            w.add_array("clip.vision.image_grid_pinpoints", [int(x) for x in pinpoints])

    tensors = [
        _Tensor("v.patch_embd.weight", (D, 3, patch, patch), "f32", scale=_V_SCALE),
        _Tensor("v.class_embd", (D,), "f32", scale=_V_SCALE),
        _Tensor("v.position_embd.weight", (n_patches + 1, D), "f32", scale=_V_SCALE),
        _Tensor("v.pre_ln.weight", (D,), "f32", "ones"),
        _Tensor("v.pre_ln.bias", (D,), "f32", "zeros"),
        *_vision_blocks(),
        _Tensor("mm.0.weight", (_MM_HIDDEN, D), "f32", scale=0.1),
        _Tensor("mm.0.bias", (_MM_HIDDEN,), "f32", scale=0.1),
        _Tensor("mm.2.weight", (n_embd_text, _MM_HIDDEN), "f32", scale=0.1),
        _Tensor("mm.2.bias", (n_embd_text,), "f32", scale=0.1),
    ]
    return add_kv, tensors


def _qwen2vl_mmproj(n_embd_text: int, name: str):
    image_size, patch = 448, 14
    D = _V_EMBD

    def add_kv(w) -> None:
        _vision_common_kv(w, projector="qwen2vl_merger", image_size=image_size, patch_size=patch,
                          proj_dim=n_embd_text, name=name)
        w.add_uint32("clip.vision.spatial_merge_size", 2)

    tensors = [
        _Tensor("v.patch_embd.weight", (D, 3, patch, patch), "f32", scale=_V_SCALE),
        _Tensor("v.patch_embd.weight.1", (D, 3, patch, patch), "f32", scale=_V_SCALE),
        *_vision_blocks(),
        _Tensor("v.post_ln.weight", (D,), "f32", "ones"),
        _Tensor("v.post_ln.bias", (D,), "f32", "zeros"),
        _Tensor("mm.0.weight", (4 * D, 4 * D), "f32", scale=0.1),
        _Tensor("mm.0.bias", (4 * D,), "f32", scale=0.1),
        _Tensor("mm.2.weight", (n_embd_text, 4 * D), "f32", scale=0.1),
        _Tensor("mm.2.bias", (n_embd_text,), "f32", scale=0.1),
    ]
    return add_kv, tensors


# --------------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------------

_LLAVA_PINPOINTS = [224, 448, 448, 224, 448, 448, 672, 224, 224, 672, 672, 672]

# Per-variant facts the tests (and demos) rely on. Token counts are per image as produced by libmtmd.
VARIANTS: dict[str, dict] = {
    "llava": {
        "text_arch": "llama",
        "projector": "mlp",
        "image_size": 224,
        "patch_size": 14,
        "tokens_per_image": 256,  # any input size: resized/padded to one 224x224 view
        "positions_per_image": 256,
        "mrope": False,
        "test_image": (224, 224),
        "test_image_chunks": 1,
        "test_image_tokens": 256,
        **{k: _TINY_TEXT[k] for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ctx")},
    },
    "llava-tiles": {
        "text_arch": "llama",
        "projector": "mlp",
        "image_size": 224,
        "patch_size": 14,
        "grid_pinpoints": [tuple(_LLAVA_PINPOINTS[i:i + 2]) for i in range(0, len(_LLAVA_PINPOINTS), 2)],
        "tokens_per_tile": 256,
        "tokens_per_image": None,  # depends on the best-fitting pinpoint: 256 * (tiles + 1)
        "mrope": False,
        "test_image": (672, 672),
        "test_image_chunks": 10,  # 3x3 tiles + overview, one image chunk each
        "test_image_tokens": 2560,
        **{k: _TINY_TEXT[k] for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ctx")},
    },
    "qwen2vl": {
        "text_arch": "qwen2vl",
        "projector": "qwen2vl_merger",
        "image_size": 448,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "tokens_per_image": None,  # (H/28) * (W/28), clamped to [8, 4096]
        "mrope": True,
        "test_image": (448, 448),
        "test_image_chunks": 1,
        "test_image_tokens": 256,
        "test_image_positions": 16,  # all cells of one still image share positions: max(grid_h, grid_w)
        **{k: _TINY_TEXT[k] for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ctx")},
    },
}


def qwen2vl_tokens(width: int, height: int) -> int:
    """Expected token count of one still image for the tiny qwen2vl pair (448x448 -> 256)."""
    # libmtmd rounds each side to a multiple of 28 (patch 14 x merge 2) and clamps the total to 8..4096
    gw, gh = max(1, round(width / 28)), max(1, round(height / 28))
    return max(8, min(4096, gw * gh))


def build_pair(variant: str, out_dir: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write ``<variant>.gguf`` and ``<variant>-mmproj.gguf`` into ``out_dir``; return both paths."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = VARIANTS[variant]
    arch = info["text_arch"]
    vocab = tiny_vocab()
    t = _TINY_TEXT
    add_kv, tensors = _text_kv_and_tensors(
        arch=arch, n_layer=t["n_layer"], n_embd=t["n_embd"], n_head=t["n_head"],
        n_head_kv=t["n_head_kv"], head_dim=t["head_dim"], n_ff=t["n_ff"], vocab=vocab, n_ctx=t["n_ctx"],
        weight_type="f16", rope_freq_base=1e6 if arch == "qwen2vl" else 1e4, rope_sections=None,
        tie_embeddings=False, qkv_bias=arch == "qwen2vl", name=f"edgekv-tiny-{variant}",
        scales=_TINY_SCALES,
    )
    # independent streams so that text and mmproj do not depend on each other's tensor count
    text_rng, vision_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    text_path = _write_gguf(out_dir / f"{variant}.gguf", arch, add_kv, tensors, text_rng)
    if variant == "qwen2vl":
        v_kv, v_tensors = _qwen2vl_mmproj(t["n_embd"], f"edgekv-tiny-{variant}-mmproj")
    else:
        pin = _LLAVA_PINPOINTS if variant == "llava-tiles" else None
        v_kv, v_tensors = _llava_mmproj(t["n_embd"], pin, f"edgekv-tiny-{variant}-mmproj")
    mmproj_path = _write_gguf(out_dir / f"{variant}-mmproj.gguf", "clip", v_kv, v_tensors, vision_rng)
    return text_path, mmproj_path


# --------------------------------------------------------------------------------------------------
# test images
# --------------------------------------------------------------------------------------------------


def make_test_image(width: int, height: int, seed: int = 0) -> bytes:
    """A deterministic RGB PNG: a smooth gradient with a few random coloured rectangles."""
    from PIL import Image

    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[..., 0] = 255.0 * xx / max(1, width - 1)
    img[..., 1] = 255.0 * yy / max(1, height - 1)
    img[..., 2] = 127.0 + 64.0 * np.sin((xx + yy) / max(8.0, (width + height) / 16))
    for _ in range(6):
        w = int(rng.integers(max(1, width // 8), max(2, width // 2)))
        h = int(rng.integers(max(1, height // 8), max(2, height // 2)))
        x0 = int(rng.integers(0, max(1, width - w)))
        y0 = int(rng.integers(0, max(1, height - h)))
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=3)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def build_mmproj(path: str | os.PathLike, n_embd_text: int, projector: str = "llava", seed: int = 0) -> Path:
    """A tiny projector for a text model of width ``n_embd_text`` (e.g. one from ``build_text_model``):
    ``"llava"`` (mlp, 256 tokens per image or video frame) or ``"qwen2vl"`` (qwen2vl_merger, dynamic
    resolution, merges two video frames in time). The vision tower is the tiny one; only the projector's
    output width follows the text model, so the text model's cost is what a benchmark measures."""
    if projector == "llava":
        add_kv, tensors = _llava_mmproj(n_embd_text, None, f"edgekv-tiny-llava-mmproj-{n_embd_text}")
    elif projector == "qwen2vl":
        add_kv, tensors = _qwen2vl_mmproj(n_embd_text, f"edgekv-tiny-qwen2vl-mmproj-{n_embd_text}")
    else:
        raise ValueError(f"projector must be 'llava' or 'qwen2vl', got {projector!r}")
    return _write_gguf(Path(path), "clip", add_kv, tensors, np.random.default_rng(seed))
