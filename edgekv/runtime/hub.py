"""`-hf owner/repo[:quant]`: pick the model GGUF and its mmproj from a Hugging Face repo and download
them with huggingface-hub (its cache, its offline mode: HF_HUB_OFFLINE=1 or --offline)."""
from __future__ import annotations

import importlib
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

from edgekv.errors import ModelLoadError

PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0", "Q4_0", "F16", "BF16")


def expand_known(spec: str) -> str:
    """A short name from the registry (`gemma3-4b`, `gemma3-4b:Q8_0`) -> 'owner/repo:QUANT'; a full
    'owner/repo[:quant]' is returned as it is."""
    from edgekv.runtime.registry import known_models

    name, _, quant = spec.partition(":")
    if "/" in name:
        return spec
    known = known_models()
    entry = known.get(name.strip().lower())
    if entry is None:
        raise ModelLoadError(f"-hf expects owner/repo[:quant] or a known model name ({', '.join(known)}), "
                             f"got {spec!r}")
    return f"{entry.repo}:{quant or entry.quant}"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'owner/repo[:quant]' -> (repo, quant)."""
    repo, _, quant = spec.partition(":")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo):
        raise ModelLoadError(f"-hf expects owner/repo[:quant], got {spec!r}")
    return repo, quant or None


def pick_files(files: list[str], quant: str | None) -> tuple[str, str | None]:
    """Choose (model file, mmproj file) among a repo's file names, like llama.cpp's -hf does."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    mmprojs = [f for f in ggufs if "mmproj" in Path(f).name.lower()]
    models = [f for f in ggufs if f not in mmprojs]
    # Split models (-00001-of-00003): only the first part is named to llama.cpp.
    models = [f for f in models if not re.search(r"-\d{5}-of-\d{5}\.gguf$", f) or "-00001-of-" in f]
    if not models:
        raise ModelLoadError("the repo has no model .gguf file")
    if quant:
        hits = [f for f in models if quant.lower() in Path(f).name.lower()]
        if not hits:
            names = ", ".join(Path(f).name for f in models)
            raise ModelLoadError(f"no file for quant {quant!r} in the repo (found: {names})")
        model = hits[0]
    else:
        model = next((f for q in PREFERRED_QUANTS for f in models if q.lower() in Path(f).name.lower()), models[0])
    mmproj = None
    if mmprojs:
        mmproj = next((f for q in ("f16", "bf16", "q8_0") for f in mmprojs if q in Path(f).name.lower()), mmprojs[0])
    return model, mmproj


def cache_dir() -> str | None:
    """The hub cache, read from the environment now (huggingface-hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


@lru_cache(maxsize=1)
def network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures as the installed huggingface-hub raises them: it passes its HTTP client's
    transport errors through (httpx2 in 2.x, httpx in 1.x, requests in 0.x), which are not OSErrors."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _cached_files(repo: str, cache: str | None) -> list[str]:
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(repo, local_files_only=True, cache_dir=cache))
    return [str(p.relative_to(snap)) for p in snap.rglob("*.gguf")]


def hub_reachable(timeout: float = 5.0) -> BaseException | None:
    """None when the Hub endpoint answers at all, else the connection error. One request, no retries:
    huggingface-hub's own calls retry a refused connection for ~25 s before giving up."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except network_errors() as e:
        return e
    return None


def resolve(spec: str, offline: bool | None = None,
            notify: Callable[[str], None] | None = None) -> tuple[Path, Path | None]:
    """Download (or find in the cache) the model and mmproj for `spec`. Returns local paths.

    Online, an unreachable hub falls back to the cached copy (like llama.cpp's -hf), with a note through
    `notify` (default: a warning); with nothing cached the error says so."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    spec = expand_known(spec)
    repo, quant = parse_spec(spec)
    cache = cache_dir()
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    unreachable = None
    try:
        if offline:
            files = _cached_files(repo, cache)
        else:
            unreachable = hub_reachable()
            if unreachable is None:
                files = HfApi().list_repo_files(repo)
            else:
                files = _cached_files(repo, cache)
                (notify or warnings.warn)(f"could not reach Hugging Face ({unreachable}); using the cached {spec}")
        model_f, mmproj_f = pick_files(files, quant)
        local = offline or unreachable is not None
        model = Path(hf_hub_download(repo, model_f, local_files_only=local, cache_dir=cache))
        mmproj = Path(hf_hub_download(repo, mmproj_f, local_files_only=local, cache_dir=cache)) if mmproj_f else None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelLoadError(f"{spec} is not in the Hugging Face cache and offline mode is on "
                                 "(HF_HUB_OFFLINE / --offline): download it once online, or pass -m/--mmproj "
                                 "with local files") from None
        raise ModelLoadError(f"could not reach Hugging Face for {spec}"
                             + (f" ({unreachable})" if unreachable else "")
                             + " and it is not in the cache: check the connection, or pass -m/--mmproj "
                             "with local files") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"Hugging Face has no repo {repo} that you can read: check the name, or for a "
                             "private or gated repo log in first (`hf auth login` or HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise ModelLoadError(f"Hugging Face refused {spec}: {str(e).splitlines()[0]}") from None
    except network_errors() as e:  # network down mid-download, disk full, ...
        raise ModelLoadError(f"could not download {spec} ({e}); set HF_HUB_OFFLINE=1 to use the cache only") from None
    return model, mmproj
