"""The `edgekv` command line: one module per command, thin over the Python API."""
