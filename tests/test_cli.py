"""The CLI through click's CliRunner: happy paths, and every bad input ends in one clear line, exit 2."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekv.cli.main import cli

from conftest import THREADS

CHAT_DOC = Path(__file__).resolve().parent.parent / "docs" / "chat.md"


def run(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def chat_args(pairs, variant="llava", *extra):
    model, mmproj, image = pairs[variant]
    return ["chat", "-m", model, "--mmproj", mmproj, "--image", image, "-t", THREADS, "-c", 4096, "-b", 2048,
            *extra]


def assert_clean_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert re.search(pattern, result.output), result.output


def test_one_shot_chat_streams_and_reports(tiny_pairs):
    r = run(*chat_args(tiny_pairs, "llava", "-p", "describe", "--method", "snapkv", "--budget", "0.25", "-n", 8))
    assert r.exit_code == 0, r.output
    assert "media tokens 256" in r.output
    assert re.search(r"KV cells\s+\d+ -> \d+", r.output)
    assert "compaction" in r.output and "decode" in r.output and "peak RSS" in r.output


def test_auto_prints_its_choice(tiny_pairs):
    r = run(*chat_args(tiny_pairs, "qwen2vl", "-p", "describe the picture", "-n", 2))
    assert r.exit_code == 0, r.output
    assert "auto -> " in r.output


def test_repl_commands(tiny_pairs):
    model, mmproj, image = tiny_pairs["llava"]
    script = f"/image {image}\nwhat is this?\n/stats\n/image /nonexistent.png\n/clear\nhello\n/exit\n"
    r = CliRunner().invoke(cli, ["chat", "-m", str(model), "--mmproj", str(mmproj), "-t", str(THREADS),
                                 "-n", "3", "--no-report"], input=script)
    assert r.exit_code == 0, r.output
    assert "attached" in r.output and "media tokens 256" in r.output
    assert "image not found" in r.output and "conversation cleared" in r.output


def test_demo_runs_offline_and_saves(tmp_path):
    r = run("demo", "--variant", "llava", "--method", "streaming", "--budget", "0.5", "-n", 4,
            "--save-models", tmp_path)
    assert r.exit_code == 0, r.output
    assert re.search(r"KV cells\s+\d+ -> \d+", r.output)
    assert (tmp_path / "llava.gguf").exists() and (tmp_path / "llava-mmproj.gguf").exists()


def test_info_prints_layout(tiny_pairs):
    model, mmproj, _ = tiny_pairs["qwen2vl"]
    r = run("info", model, "--mmproj", mmproj)
    assert r.exit_code == 0, r.output
    assert re.search(r"layers\s+2", r.output) and "M-RoPE" in r.output and "yes" in r.output
    assert re.search(r"4 query, 2 KV", r.output) and "bytes per cell" in r.output


def test_methods_lists_every_method():
    from edgekv.methods import METHODS

    r = run("methods")
    assert r.exit_code == 0
    for name in METHODS:
        assert re.search(rf"^{re.escape(name)}\s", r.output, re.M)


def test_missing_model(tmp_path):
    assert_clean_error(run("chat", "-m", tmp_path / "nope.gguf", "-p", "x"), "model not found")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"hello world, not a model")
    assert_clean_error(run("chat", "-m", bad, "-p", "x"), "not a GGUF file")


def test_truncated_gguf(tmp_path, tiny_pairs):
    model = tiny_pairs["llava"][0]
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(model.read_bytes()[:5000])
    assert_clean_error(run("chat", "-m", bad, "-p", "x"), "could not load the model")


def test_missing_image(tiny_pairs):
    model, mmproj, _ = tiny_pairs["llava"]
    assert_clean_error(run("chat", "-m", model, "--mmproj", mmproj, "--image", "/no/such.png", "-p", "x"),
                       "image not found")


def test_corrupt_image(tiny_pairs, tmp_path):
    model, mmproj, _ = tiny_pairs["llava"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    assert_clean_error(run("chat", "-m", model, "--mmproj", mmproj, "--image", bad, "-p", "x", "-t", 2),
                       "cannot read image")


def test_image_without_mmproj(tiny_pairs):
    model, _, image = tiny_pairs["llava"]
    assert_clean_error(run("chat", "-m", model, "--image", image, "-p", "x", "-t", 2), "needs a multimodal projector")


def test_mmproj_that_does_not_match(tiny_pairs, tmp_path):
    from edgekv.testing.tiny import build_text_model

    other = build_text_model(tmp_path / "other.gguf", n_layer=1, n_embd=64, n_head=2, n_head_kv=1, head_dim=32,
                             n_ff=128, weight_type="f16", n_ctx=2048)
    _, mmproj, image = tiny_pairs["llava"]
    assert_clean_error(run("chat", "-m", other, "--mmproj", mmproj, "--image", image, "-p", "x", "-t", 2),
                       "mmproj does not match")


def test_model_passed_as_mmproj(tiny_pairs):
    model, _, image = tiny_pairs["llava"]
    assert_clean_error(run("chat", "-m", model, "--mmproj", model, "--image", image, "-p", "x", "-t", 2),
                       "not an mmproj")


@pytest.mark.parametrize("budget", ["0", "-0.5", "1.5", "abc", "nan"])
def test_bad_budget(tiny_pairs, budget):
    r = run(*chat_args(tiny_pairs, "llava", "-p", "x", "--budget", budget))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "budget" in r.output.lower()


def test_budget_larger_than_context(tiny_pairs):
    assert_clean_error(run(*chat_args(tiny_pairs, "llava", "-p", "x", "--budget", "100000")),
                       "larger than the context")


def test_context_overflow(tiny_pairs):
    model, mmproj, image = tiny_pairs["llava"]
    assert_clean_error(run("chat", "-m", model, "--mmproj", mmproj, "--image", image, "-p", "x", "-c", 128,
                           "-t", 2), "free")


def test_quantized_v_needs_flash_attention(tiny_pairs):
    assert_clean_error(run(*chat_args(tiny_pairs, "llava", "-p", "x", "-fa", "off", "-ctv", "q8_0")),
                       "needs flash attention")


def test_query_method_without_window_is_explained(tiny_pairs):
    """An image with no text after it: no question window, so snapkv cannot run; say what to use."""
    from edgekv.errors import EdgeKVError
    from edgekv.runtime import Model, Session

    model, mmproj, image = tiny_pairs["llava"]
    with Model.load(model, mmproj, threads=THREADS, flash_attn="off") as m:
        s = Session(m, method="snapkv", probe=False)
        s.append_prompt("<__media__>", [image])
        with pytest.raises(EdgeKVError, match="flashcache"):
            s.compact()
        assert s.compact(probe=True).probe == "generic"   # the default: a probe window stands in
        s.close()


def test_hf_offline_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_clean_error(run("chat", "-hf", "someone/some-model-GGUF", "-p", "x"), "not in the Hugging Face cache")


def test_readme_documents_every_chat_option():
    text = CHAT_DOC.read_text()  # the options table moved from README.md to docs/chat.md
    from edgekv.cli.chat import chat

    for p in chat.params:
        longest = max(p.opts, key=len)
        assert longest in text, f"docs/chat.md does not document {longest}"


def fake_hf_cache(home: Path, repo: str, files: dict[str, Path]) -> None:
    """The huggingface-hub cache layout: hub/models--owner--name/{refs/main, snapshots/REV/FILE}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


def test_hf_offline_from_cache_picks_model_and_mmproj(tiny_pairs, tmp_path, monkeypatch):
    model, mmproj, image = tiny_pairs["llava"]
    fake_hf_cache(tmp_path, "edgekv/tiny-llava-GGUF", {
        "tiny-llava-Q8_0.gguf": model, "tiny-llava-Q4_K_M.gguf": model, "mmproj-tiny-llava-f16.gguf": mmproj})
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from edgekv.runtime.hub import resolve

    m, p = resolve("edgekv/tiny-llava-GGUF")
    assert m.name == "tiny-llava-Q4_K_M.gguf" and p.name == "mmproj-tiny-llava-f16.gguf"
    m, _ = resolve("edgekv/tiny-llava-GGUF:q8_0")
    assert m.name == "tiny-llava-Q8_0.gguf"
    r = run("chat", "-hf", "edgekv/tiny-llava-GGUF", "--offline", "--image", image, "-p", "hi", "-n", 2, "-t", 2)
    assert r.exit_code == 0, r.output
    assert "media tokens 256" in r.output
    assert_clean_error(run("chat", "-hf", "edgekv/tiny-llava-GGUF:Q2_K", "--offline", "-p", "x"), "no file for quant")


def test_hf_spec_is_validated():
    assert_clean_error(run("chat", "-hf", "not a repo", "-p", "x"), "owner/repo")


def _all_methods():
    from edgekv.methods import METHODS

    return sorted(METHODS)


@pytest.mark.parametrize("method", _all_methods())
@pytest.mark.parametrize("variant,cache", [("llava-tiles", ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]),
                                           ("qwen2vl", ["-fa", "off"])])
def test_every_method_through_chat(tiny_pairs, method, variant, cache):
    r = run(*chat_args(tiny_pairs, variant, "-p", "describe the picture", "--method", method, "--budget", "0.2",
                       "-n", 3, *cache))
    assert r.exit_code == 0, r.output
    m = re.search(r"KV cells\s+(\d+) -> (\d+)", r.output)
    assert m, r.output
    before, after = int(m.group(1)), int(m.group(2))
    assert (after == before) if method == "full" else (after < 0.75 * before), r.output


def test_query_agnostic_method_skips_query_capture(tiny_pairs, monkeypatch):
    """--method knorm never reads the question window: the model is loaded without the capture callback."""
    from edgekv.methods import METHODS, uses_queries
    from edgekv.runtime import Model

    assert uses_queries("auto") and uses_queries("snapkv") and uses_queries("flowmm")
    assert not uses_queries("knorm") and not uses_queries("flashcache") and not uses_queries("full")
    assert {n for n in METHODS if uses_queries(n)} == {n for n, f in METHODS.items()
                                                        if f().needs_queries or n == "auto"}
    loaded = []
    real_load = Model.load.__func__

    def spy(cls, *args, **kw):
        m = real_load(cls, *args, **kw)
        loaded.append(m)
        return m

    monkeypatch.setattr(Model, "load", classmethod(spy))
    for method, captured in (("knorm", False), ("snapkv", True)):
        r = run(*chat_args(tiny_pairs, "llava", "-p", "describe", "--method", method, "-n", 2, "-fa", "off"))
        assert r.exit_code == 0, r.output
        assert (loaded[-1].capture is not None) is captured
        assert ("query window" in r.output) is captured and ("query-agnostic" in r.output) is not captured
