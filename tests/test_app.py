"""The app-facing API (edgekv.load_model / edgekv.Chat) on the tiny llava pair, and the docs/python-api.md example."""
from __future__ import annotations

import threading
from pathlib import Path

import edgekv
from edgekv.runtime import GenerationResponse

from conftest import THREADS

README = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_stream_cancel_progress_save_load(tiny_pairs, tmp_path):
    model_path, mmproj, image = tiny_pairs["llava"]
    seen: list[tuple[str, int, int]] = []
    model = edgekv.load_model(model_path, mmproj, n_ctx=4096, threads=THREADS, flash_attn="off")
    try:
        chat = edgekv.Chat(model, method="snapkv", budget=0.25, progress=lambda *a: seen.append(a))
        out = list(chat.stream("describe this image", [image], max_tokens=6))
        assert all(isinstance(r, GenerationResponse) for r in out) and out[-1].finish_reason in ("stop", "length")
        assert ("image", 1, 1) in seen and any(s == "prefill" for s, _, _ in seen)
        last = chat.last
        assert last.completion_tokens == out[-1].generation_tokens and last.kv_bytes < last.full_bytes
        n_media = chat.session.cache.n_media

        # cancel() from another thread stops the generation; the partial answer stays
        stop = threading.Event()

        def on_token():
            for r in chat.stream("what is the color", max_tokens=2000):
                if r.generation_tokens == 3:
                    stop.set()
                    chat.cancel()
                yield r
        recs = list(on_token())
        assert recs[-1].finish_reason == "cancelled" and recs[-1].generation_tokens <= 4
        assert chat.messages[-1]["role"] == "assistant"
        assert chat.session.cache.n_media == n_media          # the follow-up did not encode the image again

        path = tmp_path / "conv.edgekv"
        chat.save(path)
        messages = [dict(m) for m in chat.messages]
        answer = chat.ask("is there a cat", max_tokens=4)
        chat.close()
        again = edgekv.Chat.load(model, path)
        assert again.messages == messages
        assert again.ask("is there a cat", max_tokens=4) == answer      # same cache, same greedy answer
        again.close()
    finally:
        model.close()


def test_readme_app_example_runs(tiny_pairs, tmp_path, monkeypatch, capsys):
    model, mmproj, image = tiny_pairs["llava"]
    code = README.read_text().split("## Python API for apps", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = (code.replace('"model.gguf"', repr(str(model))).replace('"mmproj.gguf"', repr(str(mmproj)))
            .replace('"photo.png"', repr(str(image))).replace("n_ctx=8192", f"n_ctx=8192, threads={THREADS}"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python-api.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "[image 1/1]" in out and out.count("TurnSummary(") == 3 and "Error" not in out
    assert (tmp_path / "conversation.edgekv").stat().st_size > 0
