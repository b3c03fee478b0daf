"""Test helpers shipped with the package: tiny synthetic GGUF model pairs (`tiny.py`), so tests, demos and
benchmarks run offline without downloading a model."""
