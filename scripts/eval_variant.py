"""`edgekv eval` with experimental method variants registered (not in the package): what docs/memory.md
("Budget 0.25 under 0.1 at 4k and 8k") measured.

    python scripts/eval_variant.py eval --media --lengths 4k --methods hybridkv,hybridkv-dyn ... --out DIR

- `hybridkv-dyn`: hybridkv with theta = 1, so no head counts as static: every head keeps whole chunks
  (the dynamic heads' rule), none keeps single tokens by pooled attention.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from edgekv.methods.hybridkv import HybridKV
from edgekv.methods.registry import register


@register("hybridkv-dyn")
@dataclass
class HybridKVDyn(HybridKV):
    theta: float = 1.0      # coverage of all the mass: k90 = n > budget, so every head is dynamic
    name = "hybridkv-dyn"


if __name__ == "__main__":
    from edgekv.cli.main import cli

    cli(sys.argv[1:])
