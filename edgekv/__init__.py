"""edgekv: budgeted KV-cache eviction and merging for multimodal LLMs on llama.cpp."""
from __future__ import annotations

import os

# OpenMP spinning on a busy 2-core machine made runs ~100x slower; must be set before llama.cpp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edgekv.version import __version__  # noqa: E402

from edgekv.errors import EdgeKVError  # noqa: E402

__all__ = ["EdgeKVError", "__version__"]

# The app-facing API (edgekv/app.py), imported on first use so `import edgekv` stays light.
_APP = ("load_model", "Chat", "TurnSummary", "CancelToken")
__all__ += list(_APP)


def __getattr__(name: str):
    if name in _APP:
        from edgekv import app

        return getattr(app, name)
    raise AttributeError(f"module 'edgekv' has no attribute {name!r}")
