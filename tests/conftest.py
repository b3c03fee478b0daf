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
    from edgekv.tiny import VARIANTS, build_pair, make_test_image

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
