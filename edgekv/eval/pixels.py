"""Text in pixels: a projector that lets a real text model read token sequences delivered as images.

No real vision-language model is available offline. This builds an mmproj for a given *text* GGUF (the
real Gemma 3 270M) whose vision encoder and projector are an exact affine decode: one image patch carries
one token, its pixel bytes hold that token's input embedding quantised per dimension (2 bytes a value), and
mtmd hands the model (almost exactly) the embedding it would have computed from the token id. So the media
path (mtmd chunks, image spans, compaction of media cells) runs on real weights and real semantics.
Recipe and pitfalls: docs/text-in-pixels.md. The media tokens are text tokens: their KV
statistics are those of text, not of natural images (say so wherever numbers from here are quoted).

    proj  = build_projector(text_gguf)          # cached under $EDGEKV_HOME/pixels, ~10 MB, seconds
    codec = PixelCodec.for_model(text_gguf)     # per-dimension ranges cached next to it
    images = codec.encode(token_ids, pad=newline_id)   # [336, 336, 3] uint8 arrays, 256 tokens each

Why the pieces are what they are (each measured: docs/text-in-pixels.md, "Facts the recipe depends on"):
- patch conv input = the raw byte (image_mean 0, image_std 1/255) and every conv weight f16-exact: the conv
  runs in f16;
- the decode offset rides on `v.position_embd`; no class embedding, no layer norms, block_count 1 (the llava
  graph runs layers 0..n-2, i.e. none);
- mm.0 = I with bias +shift, GELU, mm.2 = I with bias -shift: GELU is the identity for x >= 10; f32 weights;
- Gemma multiplies token embeddings by sqrt(n_embd) only for token input, so the projector outputs the
  scaled embedding.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PATCH = 21          # 21*21*3 = 1323 byte slots: 2 bytes per value for n_embd <= 661
GRID = 16           # patches per side: 256 tokens per image
LEVELS = 65535      # 2-byte codes
VERSION = 1         # bump when the projector layout changes (invalidates the cache)


def _home() -> Path:
    from edgekv.eval.gemma import edgekv_home

    return edgekv_home() / "pixels"


def _f16_ceil(x: np.ndarray) -> np.ndarray:
    """The smallest float16-representable values >= x (x > 0), as float32."""
    x = np.maximum(np.asarray(x, np.float32), np.float32(np.finfo(np.float16).tiny))
    h = x.astype(np.float16)
    up = h.astype(np.float32) < x
    h[up] = np.nextafter(h[up], np.float16(np.inf))
    return h.astype(np.float32)


def _model_key(text_gguf: Path) -> str:
    st = text_gguf.stat()
    h = hashlib.sha1(f"{text_gguf.name}|{st.st_size}|{VERSION}|{PATCH}|{GRID}".encode()).hexdigest()[:12]
    return f"{text_gguf.stem}-{h}"


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def _read_gguf_tensor(path: Path, name: str) -> tuple[str, int, tuple[int, ...], np.ndarray]:
    """(architecture, ggml type, ggml dims, raw bytes memmap [rows, row bytes]) of one tensor.
    A minimal header walk: gguf.GGUFReader parses every tokenizer array element by element (~20 s for
    Gemma's 262k-token vocabulary); here they are skipped."""
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # the header (vocabulary included) fits well within this

    off = 0

    def take(fmt: str):
        nonlocal off
        v = struct.unpack_from("<" + fmt, buf, off)
        off += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string() -> bytes:
        nonlocal off
        n = take("Q")
        off += n
        return buf[off - n:off]

    def skip(vtype: int) -> object:
        nonlocal off
        if vtype == 8:
            return string()
        if vtype == 9:
            et, n = take("IQ")
            if et == 8:
                for _ in range(n):
                    off += struct.unpack_from("<Q", buf, off)[0] + 8
            else:
                off += _GGUF_SCALAR[et] * n
            return None
        size = _GGUF_SCALAR[vtype]
        off += size
        return buf[off - size:off]

    magic, _version, n_tensors, n_kv = take("4sIQQ")
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    arch, align = "", 32
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        val = skip(vtype)
        if key == b"general.architecture":
            arch = val.decode()
        elif key == b"general.alignment":
            align = struct.unpack("<I", val)[0]
    found = None
    for _ in range(n_tensors):
        tname = string()
        nd = take("I")
        dims = struct.unpack_from(f"<{nd}Q", buf, off)
        off += 8 * nd
        ttype, toff = take("IQ")
        if tname.decode() == name:
            found = (ttype, tuple(int(x) for x in dims), toff)
    if found is None:
        raise ValueError(f"{path} has no tensor {name}")
    data_start = (off + align - 1) // align * align
    ttype, dims, toff = found
    block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
    row_bytes = dims[0] // block * tsize
    rows = int(np.prod(dims[1:]))
    mm = np.memmap(path, np.uint8, "r", offset=data_start + toff, shape=(rows, row_bytes))
    return arch, ttype, dims, mm


class _Embeddings:
    """Rows of the text model's token embedding table, dequantised (and scaled as the graph does)."""

    def __init__(self, text_gguf: Path):
        from gguf.constants import GGMLQuantizationType

        arch, ttype, dims, mm = _read_gguf_tensor(text_gguf, "token_embd.weight")
        self.n_embd, self.n_vocab = dims[0], dims[1]
        self.qtype = GGMLQuantizationType(ttype)
        self.data = mm  # [n_vocab, row bytes]
        # Gemma's graph scales token embeddings by sqrt(n_embd), but only for token-id input.
        self.scale = np.float32(math.sqrt(self.n_embd)) if arch.startswith("gemma") else np.float32(1.0)
        self.arch = arch

    def rows(self, ids: np.ndarray) -> np.ndarray:
        from gguf.quants import dequantize

        raw = np.asarray(self.data[np.asarray(ids, np.int64)])
        x = dequantize(raw, self.qtype).reshape(len(ids), self.n_embd).astype(np.float32)
        return x * self.scale

    def ranges(self, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        lo = np.full(self.n_embd, np.inf, np.float32)
        hi = np.full(self.n_embd, -np.inf, np.float32)
        for i in range(0, self.n_vocab, chunk):
            x = self.rows(np.arange(i, min(i + chunk, self.n_vocab)))
            np.minimum(lo, x.min(axis=0), out=lo)
            np.maximum(hi, x.max(axis=0), out=hi)
        return lo, hi


@dataclass
class PixelCodec:
    """Token ids <-> exact-size images for the projector built for one text model."""

    lo: np.ndarray        # [n_embd] float32: decoded value of code 0
    step: np.ndarray      # [n_embd] float32, float16-exact: value of one code step
    emb: _Embeddings
    patch: int = PATCH
    grid: int = GRID

    @property
    def image_size(self) -> int:
        return self.patch * self.grid

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @property
    def n_embd(self) -> int:
        return int(self.lo.shape[0])

    @classmethod
    def for_model(cls, text_gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> "PixelCodec":
        text_gguf = Path(text_gguf)
        emb = _Embeddings(text_gguf)
        if 2 * emb.n_embd > 3 * PATCH * PATCH:
            raise ValueError(f"n_embd {emb.n_embd} needs more than {3 * PATCH * PATCH // 2} values per patch")
        d = Path(cache_dir) if cache_dir is not None else _home()
        path = d / f"{_model_key(text_gguf)}-ranges.npz"
        if path.is_file():
            z = np.load(path)
            lo, hi = z["lo"], z["hi"]
        else:
            lo, hi = emb.ranges()
            d.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".part.npz")
            np.savez(tmp, lo=lo, hi=hi)
            os.replace(tmp, path)
        step = _f16_ceil((hi - lo) / LEVELS)
        return cls(lo=lo.astype(np.float32), step=step, emb=emb)

    def codes(self, ids) -> np.ndarray:
        """[n, n_embd] uint16 codes of the scaled embeddings of `ids`."""
        x = self.emb.rows(np.asarray(ids, np.int64))
        q = np.rint((x - self.lo) / self.step)
        return np.clip(q, 0, LEVELS).astype(np.uint16)

    def decoded(self, ids) -> np.ndarray:
        """[n, n_embd] the values the projector will hand the model (for checks)."""
        return self.lo + self.step * self.codes(ids).astype(np.float32)

    def encode(self, ids, pad: int) -> list[np.ndarray]:
        """Token ids -> [image_size, image_size, 3] uint8 images, `tokens_per_image` tokens each in
        row-major patch order; the last image is padded with `pad` tokens."""
        ids = [int(t) for t in ids]
        k = self.tokens_per_image
        n_img = max(1, -(-len(ids) // k))
        ids = ids + [int(pad)] * (n_img * k - len(ids))
        q = self.codes(ids)                                          # [n, E]
        slots = np.zeros((len(ids), 3 * self.patch * self.patch), np.uint8)
        slots[:, 0:2 * self.n_embd:2] = (q >> 8).astype(np.uint8)    # high byte
        slots[:, 1:2 * self.n_embd:2] = (q & 0xFF).astype(np.uint8)  # low byte
        P, G = self.patch, self.grid
        # slot s = (c, y, x) of the patch; patch t = (py, px) of the image
        pat = slots.reshape(n_img, G, G, 3, P, P).transpose(0, 1, 4, 2, 5, 3)  # img, py, y, px, x, c
        return [np.ascontiguousarray(pat[i].reshape(G * P, G * P, 3)) for i in range(n_img)]

    def n_images(self, n_tokens: int) -> int:
        return max(1, -(-n_tokens // self.tokens_per_image))


def _shift(lo: np.ndarray) -> float:
    """Bias that lifts every value to >= 10 (where ggml's GELU is the identity), a round number."""
    return float(max(40.0, math.ceil(10.0 - float(lo.min()))))


def build_projector(text_gguf: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write (once; cached) the text-in-pixels mmproj for `text_gguf` and return its path."""
    import logging

    from gguf import GGUFWriter

    text_gguf = Path(text_gguf)
    d = Path(out_dir) if out_dir is not None else _home()
    path = d / f"{_model_key(text_gguf)}-mmproj.gguf"
    if path.is_file():
        return path
    codec = PixelCodec.for_model(text_gguf, d)
    E, P, G = codec.n_embd, PATCH, GRID
    shift = _shift(codec.lo)

    w_patch = np.zeros((E, 3 * P * P), np.float32)
    w_patch[np.arange(E), 2 * np.arange(E)] = codec.step * 256.0     # high byte (f16-exact: power of 2)
    w_patch[np.arange(E), 2 * np.arange(E) + 1] = codec.step        # low byte
    w_patch = w_patch.reshape(E, 3, P, P)
    pos = np.broadcast_to(codec.lo, (G * G, E)).astype(np.float32)  # the decode offset
    eye = np.eye(E, dtype=np.float32)
    n_ff = 64

    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    d.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    w = GGUFWriter(tmp, "clip")
    w.add_name(f"edgekv-text-in-pixels-{text_gguf.stem}")
    w.add_file_type(0)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_llava_projector", True)
    w.add_uint32("clip.vision.image_size", P * G)
    w.add_uint32("clip.vision.patch_size", P)
    w.add_uint32("clip.vision.embedding_length", E)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.block_count", 1)   # the llava graph runs blocks 0..n-2: none
    w.add_uint32("clip.vision.attention.head_count", 8)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.projection_dim", E)
    w.add_array("clip.vision.image_mean", [0.0, 0.0, 0.0])
    w.add_array("clip.vision.image_std", [1.0 / 255.0] * 3)
    w.add_tensor("v.patch_embd.weight", w_patch)
    w.add_tensor("v.position_embd.weight", pos)
    b = "v.blk.0."
    for n in ("attn_q", "attn_k", "attn_v", "attn_out"):  # never run, but the loader wants them
        w.add_tensor(b + n + ".weight", np.zeros((E, E), np.float16))
        w.add_tensor(b + n + ".bias", np.zeros(E, np.float32))
    for n in ("ln1", "ln2"):
        w.add_tensor(b + n + ".weight", np.ones(E, np.float32))
        w.add_tensor(b + n + ".bias", np.zeros(E, np.float32))
    w.add_tensor(b + "ffn_up.weight", np.zeros((n_ff, E), np.float16))
    w.add_tensor(b + "ffn_up.bias", np.zeros(n_ff, np.float32))
    w.add_tensor(b + "ffn_down.weight", np.zeros((E, n_ff), np.float16))
    w.add_tensor(b + "ffn_down.bias", np.zeros(E, np.float32))
    w.add_tensor("mm.0.weight", eye)
    w.add_tensor("mm.0.bias", np.full(E, shift, np.float32))
    w.add_tensor("mm.2.weight", eye)
    w.add_tensor("mm.2.bias", np.full(E, -shift, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    (d / f"{_model_key(text_gguf)}.json").write_text(json.dumps(
        {"model": str(text_gguf), "patch": P, "grid": G, "shift": shift, "version": VERSION}))
    return path
