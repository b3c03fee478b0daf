"""What edgekv needs to know about a model's KV cache, read from llama.cpp's loaded model: layers, heads,
head sizes, the sliding-window pattern, M-RoPE, the attention scale and RoPE of the global layers."""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

from edgekv.kv.codec import GGML_TYPES, TYPE_IDS
from edgekv.kv.rotation import KVRotation, kv_rotation
from edgekv.runtime.lib import llama_cpp

_LLAMA_ROPE_TYPE_NEOX = 2
_LLAMA_ROPE_TYPE_MROPE = 8  # LLAMA_ROPE_TYPE_MROPE (and IMROPE=40, VISION=24 share the bit)

# Interleaved sliding-window layouts llama.cpp hard-codes per architecture (llama-model.cpp
# set_swa_pattern): layer il uses the sliding window unless (il + 1) % pattern == 0.
_SWA_PATTERNS = {"gemma3": 6, "gemma3n": 5, "gemma2": 2, "cohere2": 4, "gemma-embedding": 6}


@dataclass(frozen=True)
class ModelLayout:
    """What edgekv needs to know about a model's KV cache (also what `edgekv info` prints)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int
    n_swa: int
    swa_layers: tuple[bool, ...]       # per model layer: True when it attends through the sliding window
    mrope: bool
    attn_scale: float
    n_params: int = 0
    rope_base: float = 10000.0         # of the global (compressed) layers
    rope_neox: bool = False            # NEOX pairs (i, i + d/2) instead of (2i, 2i + 1)

    @property
    def iswa(self) -> bool:
        return self.n_swa > 0 and any(self.swa_layers)

    @property
    def global_layers(self) -> list[int]:
        """Model layer indices whose cells live in the compressible (base) cache block."""
        return [il for il, swa in enumerate(self.swa_layers) if not swa]

    @property
    def window_layers(self) -> list[int]:
        """Model layer indices whose cells live in the sliding-window block (none on a plain model)."""
        return [il for il, swa in enumerate(self.swa_layers) if swa]

    def bytes_per_cell(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """K+V bytes one cell costs in the compressible block (all global layers)."""
        _, bk, sk = GGML_TYPES[TYPE_IDS[type_k]]
        _, bv, sv = GGML_TYPES[TYPE_IDS[type_v]]
        per_layer = self.n_head_kv * (self.head_dim * sk // bk + self.head_dim_v * sv // bv)
        return per_layer * len(self.global_layers)

    def kv_rotation(self, type_k: str = "f16", type_v: str = "f16") -> KVRotation:
        """Whether llama.cpp stores K / V Hadamard-rotated in a context created now with these cache
        types (quantized types; LLAMA_ATTN_ROT_DISABLE is read then): edgekv.kv.rotation."""
        return kv_rotation(type_k, type_v, self.head_dim, self.head_dim_v)


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None



def read_layout(model) -> ModelLayout:
    arch = _meta(model, "general.architecture") or "unknown"
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_head = llama_cpp.llama_model_n_head(model)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    key_len = _meta(model, f"{arch}.attention.key_length")
    val_len = _meta(model, f"{arch}.attention.value_length")
    head_dim = int(key_len) if key_len else n_embd // max(n_head, 1)
    head_dim_v = int(val_len) if val_len else head_dim
    n_swa = llama_cpp.llama_model_n_swa(model)
    if n_swa > 0:
        pattern = _SWA_PATTERNS.get(arch)
        if pattern is None:
            # Unknown interleaving: treat all as global; the codec then checks block sizes against it.
            swa = tuple(False for _ in range(n_layer))
        else:
            swa = tuple((il + 1) % pattern != 0 for il in range(n_layer))
    else:
        swa = tuple(False for _ in range(n_layer))
    scale_meta = _meta(model, f"{arch}.attention.scale")
    attn_scale = float(scale_meta) if scale_meta and float(scale_meta) > 0 else 1.0 / math.sqrt(head_dim)
    mrope = (llama_cpp.llama_model_rope_type(model) & _LLAMA_ROPE_TYPE_MROPE) != 0 and \
        llama_cpp.llama_model_rope_type(model) > 0
    rope_base = float(_meta(model, f"{arch}.rope.freq_base") or 10000.0)
    rope_neox = llama_cpp.llama_model_rope_type(model) == _LLAMA_ROPE_TYPE_NEOX
    return ModelLayout(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
                       head_dim=head_dim, head_dim_v=head_dim_v,
                       n_ctx_train=llama_cpp.llama_model_n_ctx_train(model),
                       n_vocab=llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)),
                       n_swa=n_swa, swa_layers=swa, mrope=mrope, attn_scale=attn_scale,
                       n_params=int(llama_cpp.llama_model_n_params(model)), rope_base=rope_base,
                       rope_neox=rope_neox)
