"""How a model is loaded: one options object for `Model.load`, `edgekv.load_model`, captioning (and its
Ray actors) and the CLI's model options, instead of the same two dozen keywords spelled out in each."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelOptions:
    """llama.cpp's context knobs (flag names as llama.cpp's tools have them) and edgekv's own.

    n_ctx:            cells in the context (`-c`); llama.cpp pads its allocation, edgekv keeps to this.
    n_batch:          prefill batch (`-b`); one image chunk must fit it on models whose image tokens attend
                      both ways.
    n_gpu_layers:     layers offloaded (`-ngl`).
    threads:          CPU threads (`-t`; None: the cores, at most 8).
    flash_attn:       "auto", "on" or "off" (`-fa`).
    cache_type_k/v:   KV cache types (`-ctk/-ctv`: f16, bf16, q8_0, q4_0, f32).
    capture_queries:  capture the question window (query-aware methods need it; off saves a callback).
    image_max_tokens: cap one image's tokens (dynamic-resolution projectors).
    chat_template:    one of llama.cpp's built-in templates instead of the model's own.
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_gpu_layers: int = 0
    threads: int | None = None
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    capture_queries: bool = True
    image_max_tokens: int | None = None
    chat_template: str | None = None

    def with_(self, **changes) -> "ModelOptions":
        """A copy with some options changed (an unknown name is a TypeError)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
