"""llama.cpp side: model loading, the session (prefill, compaction, generation), query capture."""
from __future__ import annotations

from edgekv.runtime.model import Model, ModelLayout
from edgekv.runtime.session import CompactionReport, GenerationResponse, Session
from edgekv.runtime.turn import CancelToken

__all__ = ["Model", "ModelLayout", "Session", "CompactionReport", "GenerationResponse", "CancelToken"]
