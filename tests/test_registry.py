"""The known-model registry: `edgekv models`, and `-hf SHORT_NAME` through a Hub faked over HTTP."""
from __future__ import annotations

from click.testing import CliRunner
from fake_hub import FakeHub

from edgekv.cli.main import cli
from edgekv.runtime.hub import expand_known
from edgekv.runtime.registry import known_models, lookup

from test_hub import assert_clean_error, chat


def test_registry_entries_are_complete():
    known = known_models()
    assert "gemma3-4b" in known and "qwen2vl-2b" in known
    for k in known.values():
        assert "/" in k.repo and k.quant and k.status
    assert lookup("Gemma3-4B").repo == "ggml-org/gemma-3-4b-it-GGUF"
    assert known["qwen2vl-2b"].mrope and known["gemma3-4b"].iswa


def test_short_names_expand():
    assert expand_known("gemma3-4b") == "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M"
    assert expand_known("gemma3-4b:Q8_0") == "ggml-org/gemma-3-4b-it-GGUF:Q8_0"
    assert expand_known("me/repo:Q4_0") == "me/repo:Q4_0"


def test_models_command_lists_the_registry():
    r = CliRunner().invoke(cli, ["models"])
    assert r.exit_code == 0, r.output
    for k in known_models().values():
        assert k.name in r.output and k.spec in r.output


def test_hf_short_name_downloads_the_registry_repo(tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    repo = lookup("gemma3-4b").repo
    files = {"gemma-3-4b-it-Q4_K_M.gguf": model, "gemma-3-4b-it-Q8_0.gguf": model, "mmproj-model-f16.gguf": mmproj}
    with FakeHub({repo: files}) as hub:
        r = chat(hub.url, tmp_path / "hf", "gemma3-4b", image)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sorted(hub.downloads()) == ["gemma-3-4b-it-Q4_K_M.gguf", "mmproj-model-f16.gguf"]
        assert_clean_error(chat(hub.url, tmp_path / "hf", "no-such-model", image), "known model name")


def test_wheel_ships_the_registry_and_py_typed(tmp_path):
    """The registry is package data: a wheel (not only this source tree) must carry it."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps",
                        "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("edgekv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"edgekv/runtime/models.toml", "edgekv/py.typed"} <= names
