"""edgekv: budgeted KV-cache eviction and merging for multimodal LLMs on llama.cpp."""
from __future__ import annotations

import os

# OpenMP spinning on a busy 2-core machine made runs ~100x slower; must be set before llama.cpp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from edgekv.errors import EdgeKVError  # noqa: E402

__all__ = ["EdgeKVError", "__version__"]
