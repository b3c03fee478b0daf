"""`-hf` against a Hugging Face Hub faked at the HTTP level (tests/fake_hub.py): download, cache, errors.

Each run is a fresh `edgekv` process: huggingface-hub reads HF_ENDPOINT when it is imported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fake_hub import FakeHub

from conftest import THREADS

REPO = "edgekv/tiny-llava-GGUF"


def edgekv(hub_url: str, home: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # CI sets HF_HUB_OFFLINE=1
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="5")
    return subprocess.run([sys.executable, "-c", "from edgekv.cli.main import main; main()", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)


def chat(hub_url: str, home: Path, repo: str, image: Path) -> subprocess.CompletedProcess:
    return edgekv(hub_url, home, "chat", "-hf", repo, "--image", image, "-p", "hi", "-n", 2, "-t", THREADS,
                  "-c", 4096, "-b", 2048, "--method", "streaming")


def assert_clean_error(r: subprocess.CompletedProcess, text: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out and text in out, out


def test_hf_downloads_over_http_then_runs_from_the_cache_when_the_hub_is_gone(tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    readme = tmp_path / "README.md"
    readme.write_text("tiny llava\n")
    files = {"tiny-llava-Q8_0.gguf": model, "tiny-llava-Q4_K_M.gguf": model,
             "mmproj-tiny-llava-f16.gguf": mmproj, "README.md": readme}
    home = tmp_path / "hf"
    with FakeHub({REPO: files}) as hub:
        r = chat(hub.url, home, REPO, image)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "media tokens 256" in r.stderr
        # llama.cpp's pick: the Q4_K_M model and the f16 projector, nothing else fetched
        assert sorted(hub.downloads()) == ["mmproj-tiny-llava-f16.gguf", "tiny-llava-Q4_K_M.gguf"]
        cached = list((home / "hub").rglob("tiny-llava-Q4_K_M.gguf"))
        assert len(cached) == 1 and cached[0].read_bytes() == model.read_bytes()

        assert_clean_error(chat(hub.url, home, "edgekv/missing-GGUF", image),
                           "Hugging Face has no repo edgekv/missing-GGUF")
        assert_clean_error(chat(hub.url, home, REPO + ":Q2_K", image), "no file for quant 'Q2_K'")
        n_requests = len(hub.requests)
        gone = hub.url

    # The hub is unreachable now (connection refused): the cached copy runs, with a note.
    r = chat(gone, home, REPO, image)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "could not reach Hugging Face" in r.stderr and "using the cached" in r.stderr
    assert len(hub.requests) == n_requests
    # Nothing cached for that repo: one clear line, not httpx's traceback.
    assert_clean_error(chat(gone, home, "edgekv/other-GGUF", image),
                       "could not reach Hugging Face for edgekv/other-GGUF")
