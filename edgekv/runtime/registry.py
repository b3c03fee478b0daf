"""Known model repos: short names (`-hf gemma3-4b`) -> Hugging Face repo, quant and notes.

The registry is `edgekv/runtime/models.toml`, read as package data so it is found the same way from a
source tree, an editable install and a wheel (models/README.md at the repository root points to it)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from edgekv.errors import ModelLoadError


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo: str
    quant: str
    mmproj: str
    template: str
    mrope: bool
    iswa: bool
    status: str

    @property
    def spec(self) -> str:
        """The `owner/repo:QUANT` spec `-hf` resolves."""
        return f"{self.repo}:{self.quant}"


def known_models() -> dict[str, KnownModel]:
    text = resources.files("edgekv.runtime").joinpath("models.toml").read_text("utf-8")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ModelLoadError(f"the model registry models.toml is broken: {e}") from None
    try:
        return {name: KnownModel(name=name, **fields) for name, fields in table.items()}
    except TypeError as e:  # a missing or misspelt field (or an unquoted name with a dot in it)
        raise ModelLoadError(f"the model registry models.toml is broken: {e}") from None


def lookup(name: str) -> KnownModel | None:
    """The registry entry for a short name (case-insensitive), or None."""
    return known_models().get(name.strip().lower())
