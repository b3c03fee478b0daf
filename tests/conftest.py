"""Shared fixtures: tiny synthetic model pairs (built once per run) and the real Gemma 3 270M."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before llama.cpp loads: spinning OpenMP is 100x slower here

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

THREADS = 2


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """variant -> (model, mmproj, test image) for llava, llava-tiles and qwen2vl."""
    from edgekv.testing.tiny import VARIANTS, build_pair, make_test_image

    out = tmp_path_factory.mktemp("tiny")
    pairs = {}
    for variant in ("llava", "llava-tiles", "qwen2vl"):
        model, mmproj = build_pair(variant, out, seed=0)
        w, h = VARIANTS[variant]["test_image"]
        img = out / f"{variant}.png"
        img.write_bytes(make_test_image(w, h, seed=1))
        pairs[variant] = (model, mmproj, img)
    return pairs


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from edgekv.eval.gemma import gemma_path as _gemma_path

    return _gemma_path()


def window_softmax(q, k, scale: float):
    """softmax(q k^T * scale) of the last W tokens over T keys, causal. q [H, W, d], k [H_kv, T, d] ->
    [H, W, T]; query head h reads KV head h // (H / H_kv). The reference the capture tests compare with."""
    import numpy as np

    H, W, _ = q.shape
    T = k.shape[1]
    logits = np.einsum("hwd,htd->hwt", q, np.repeat(k, H // k.shape[0], axis=0)) * scale
    logits[:, np.arange(T)[None, :] > (T - W + np.arange(W))[:, None]] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)
