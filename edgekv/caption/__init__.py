"""Batch captioning: inputs, sinks, the per-image engine, the local loop and the Ray runner."""
