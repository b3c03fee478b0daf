"""`edgekv serve` as a subprocess on 127.0.0.1, driven by the official openai client (and httpx for the
bodies the client will not send). Tiny llava pair: one image = one 256-token chunk."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import THREADS

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "sk-test-edgekv"
MODEL_ID = "tiny-llava"
N_CTX = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, mmproj: Path, allowed: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = [sys.executable, "-c", "from edgekv.cli.main import main; main()", "serve", "-m", str(model),
               "--mmproj", str(mmproj), "--alias", MODEL_ID, "-t", str(THREADS), "-c", str(N_CTX), "-fa", "off",
               "--port", str(self.port), "--api-key", KEY, "--max-request-mb", "1", "--queue-size", "2",
               "--cache-ram", "64", "--allow-local-files", str(allowed), "--max-image-pixels", "1000000",
               "--method", "snapkv", "--budget", "0.25", *extra]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start:\n{log.read_text()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if not h["busy"] and not h["queued"]:
                return h
            time.sleep(0.05)
        raise AssertionError(f"server still busy: {h}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_pairs, tmp_path_factory):
    model, mmproj, _ = tiny_pairs["llava"]
    tmp = tmp_path_factory.mktemp("serve")
    allowed = tmp / "allowed"
    allowed.mkdir()
    s = Server(model, mmproj, allowed, tmp / "server.log")
    s.allowed = allowed
    s.outside = tmp
    yield s
    s.stop()
    log = s.log_path.read_text()
    assert "Traceback" not in log, log


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def image_url(tiny_pairs) -> str:
    return data_url(tiny_pairs["llava"][2].read_bytes())


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in images]}


def ext(resp) -> dict:
    return resp.model_extra["edgekv"]


def post(server, body, key=KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if not isinstance(body, dict):   # raw bytes, or a generator (sent chunked)
        return httpx.post(server.url + "/v1/chat/completions", content=body, timeout=60,
                          headers={**headers, "Content-Type": "application/json"}, **kw)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"], err
    assert "Traceback" not in r.text
    if code is not None:
        assert err["code"] == code, err
    return err


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL_ID in ids and "llava" in ids           # --alias and the file's stem
    h = server.health()
    assert h["status"] == "ok" and h["queue_size"] == 2


def test_image_turn_then_follow_up_reuses_the_compacted_cache(server, client, image_url):
    encodes0 = server.health()["media_chunks_encoded"]
    msgs = [user("describe this image", image_url)]
    r1 = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=6)
    e1 = ext(r1)
    assert e1["cache"] == "miss" and e1["images_encoded"] == 1 and e1["media_chunks_encoded"] == 1
    assert r1.usage.prompt_tokens > 256 and r1.usage.completion_tokens >= 1
    assert e1["cells_before"] - e1["cells_after"] == 256 - 64      # snapkv at 0.25 of the 256 image cells
    assert e1["bytes_after"] < e1["bytes_before"] and e1["kept"] and e1["kept_bytes"] > 0
    assert server.health()["media_chunks_encoded"] == encodes0 + 1

    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, user("what color is it")]
    r2 = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=6)
    e2 = ext(r2)
    assert e2["cache"] == "hit" and e2["reused_messages"] == 2
    assert e2["images_encoded"] == 0 and e2["media_chunks_encoded"] == 0     # the image was not encoded again
    assert server.health()["media_chunks_encoded"] == encodes0 + 1
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.total_tokens
    assert e2["kv_cells"] < r2.usage.total_tokens        # the kept cache is the compacted one
    assert e2["timings"]["restore_s"] >= 0 and e2["timings"]["first_token_s"] > 0


def test_streaming_matches_non_streaming(server, client, image_url):
    msgs = [user("what is in the picture", image_url)]
    whole = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=8)
    pieces, usage, finish, extra = [], None, None, None
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
            extra = (chunk.model_extra or {}).get("edgekv") or extra
    assert "".join(pieces) == whole.choices[0].message.content        # greedy: same state, same answer
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert extra["images_encoded"] == 1 and extra["cells_after"] < extra["cells_before"]


def test_two_concurrent_clients(server, client, image_url):
    prompts = ["describe the image", "what is the color"]
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
            r = c.chat.completions.create(model=MODEL_ID, messages=[user(prompts[i], image_url)], max_tokens=6)
            answers[i] = r.choices[0].message.content
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(answers) == 2, errors
    for i in range(2):   # each equals the same request served alone
        alone = client.chat.completions.create(model=MODEL_ID, messages=[user(prompts[i], image_url)], max_tokens=6)
        assert alone.choices[0].message.content == answers[i]


def test_bad_requests_get_openai_errors(server, client, image_url, tmp_path):
    ok = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(server, ok).status_code == 200
    assert_error(post(server, b'{"model": "tiny-llava", "messages": [}'), 400, "invalid_json")
    assert_error(post(server, {"model": MODEL_ID}), 400)                                  # no messages
    assert_error(post(server, {**ok, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(post(server, {**ok, "model": "gpt-5"}), 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=ok["messages"])
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    assert_error(post(server, {**ok, "messages": [user("what", junk)]}), 400, "invalid_image")
    assert_error(post(server, {**ok, "messages": [user("what", "data:image/png;base64,@@@")]}), 400, "invalid_image")
    big = _png(2000, 1000)   # 2 MP > --max-image-pixels 1e6, a small file
    assert_error(post(server, {**ok, "messages": [user("what", data_url(big))]}), 400, "image_too_large")
    assert_error(post(server, {**ok, "messages": [user("what", "https://example.com/a.png")]}), 400,
                 "unsupported_image_url")
    long_text = " ".join(["the cat is red"] * 1500)    # > N_CTX tokens
    assert_error(post(server, {**ok, "messages": [{"role": "user", "content": long_text}]}), 400,
                 "context_length_exceeded")
    for budget in (1.5, -1, 0, "lots", N_CTX + 1):
        assert_error(post(server, {**ok, "edgekv": {"budget": budget}}), 400, "invalid_budget")
    assert_error(post(server, {**ok, "edgekv": {"method": "nope"}}), 400)
    assert_error(post(server, {**ok, "edgekv": {"budgets": 0.5}}), 400)                  # a typo is not ignored
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=ok["messages"], extra_body={"edgekv": {"budget": 2.5}})
    assert e.value.body["code"] == "invalid_budget"
    assert_error(post(server, {**ok, "messages": [{"role": "assistant", "content": "x"}]}), 400)
    assert_error(post(server, {**ok, "n": 2}), 400)
    assert post(server, {**ok, "edgekv": {"method": "knorm", "budget": 0.5}}).status_code == 200
    assert server.health()["status"] == "ok"


def test_request_options_override_the_defaults(server, client, image_url):
    r = client.chat.completions.create(model=MODEL_ID, messages=[user("describe", image_url)], max_tokens=2,
                                       extra_body={"edgekv": {"method": "knorm", "budget": 0.5}})
    e = ext(r)
    assert e["method"] == "knorm" and e["cells_before"] - e["cells_after"] == 128


def test_api_key(server):
    ok = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert_error(post(server, ok, key="wrong"), 401, "invalid_api_key")
    assert_error(post(server, ok, key=None), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200       # health needs no key


def test_oversized_body_gets_413_and_the_server_stays_up(server, client):
    body = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * (3 << 20)}]})
    assert_error(post(server, body), 413, "request_too_large")
    # chunked (no Content-Length): counted as it arrives
    def chunks():
        for _ in range(40):
            yield b" " * (100 << 10)
    assert_error(post(server, chunks()), 413, "request_too_large")
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_local_files_only_under_the_allowed_folder(server, client, tiny_pairs):
    png = tiny_pairs["llava"][2].read_bytes()
    inside = server.allowed / "a.png"
    inside.write_bytes(png)
    outside = server.outside / "b.png"
    outside.write_bytes(png)
    link = server.allowed / "link.png"
    link.symlink_to(outside)
    ok = {"model": MODEL_ID, "max_tokens": 2}
    r = post(server, {**ok, "messages": [user("describe", str(inside))]})
    assert r.status_code == 200 and r.json()["edgekv"]["images_encoded"] == 1
    assert post(server, {**ok, "messages": [user("describe", "file://" + str(inside))]}).status_code == 200
    for path in (outside, link, server.allowed / ".." / "b.png"):
        assert_error(post(server, {**ok, "messages": [user("describe", str(path))]}), 403, "path_not_allowed")


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_port_in_use_is_one_clear_line(tiny_pairs):
    model, mmproj, _ = tiny_pairs["llava"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", "from edgekv.cli.main import main; main()", "serve", "-m",
                            str(model), "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"Error: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr


class Held:
    """An in-process server (uvicorn in a thread) whose worker the test can hold at a known point, so
    queue and disconnect states are exact rather than races against a fast tiny model. The holds go
    through the session's own progress callback and its chat() generator: the llama.cpp work is real."""

    def __init__(self, tiny_pairs, n_ctx: int = N_CTX, engine: dict | None = None, app: dict | None = None) -> None:
        """engine, app: keywords for Engine (default: snapkv, a queue of 1) and create_app."""
        import uvicorn

        from edgekv.runtime import Model
        from edgekv.server.app import create_app
        from edgekv.server.engine import Engine

        model, mmproj, self.image = tiny_pairs["llava"]
        self.model = Model.load(model, mmproj, n_ctx=n_ctx, threads=THREADS, flash_attn="off")
        self.engine = Engine(self.model, model_id=MODEL_ID, **(engine or dict(method="snapkv", queue_size=1)))
        self.gate = threading.Event()
        self.hold_image = False          # hold at the first image chunk of a turn
        self.hold_after: int | None = None   # hold after this many answer records
        self.holding = threading.Event()
        s = self.engine.session
        count, chat = s.progress, s.chat

        def progress(stage: str, done: int, total: int) -> None:
            count(stage, done, total)
            if stage == "image" and self.hold_image:
                self.holding.set()
                self.gate.wait(60)

        def held_chat(*args, **kw):
            with contextlib.closing(chat(*args, **kw)) as records:
                for i, r in enumerate(records):
                    yield r
                    if self.hold_after is not None and i + 1 == self.hold_after:
                        self.holding.set()
                        self.gate.wait(60)

        s.progress, s.chat = progress, held_chat
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.engine, **(app or {})), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)

    def hold(self, after: int | None = None, image: bool = False) -> None:
        """Hold the worker after `after` answer records, or (image) inside an image's prefill."""
        self.gate.clear()
        self.holding.clear()
        self.hold_after, self.hold_image = after, image

    def release(self) -> None:
        self.hold_image, self.hold_after = False, None
        self.gate.set()

    def close(self) -> None:
        self.release()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()
        self.model.close()


def wait_for(cond, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture()
def held(tiny_pairs):
    h = Held(tiny_pairs)
    yield h
    h.close()


def test_full_queue_gets_503(held, image_url):
    """One request is served (held inside its image's prefill), --queue-size 1 waits, the next gets 503."""
    url = held.url + "/v1/chat/completions"
    image = {"model": MODEL_ID, "messages": [user("describe this", image_url)], "max_tokens": 2}
    text = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    codes: dict[str, int] = {}

    def send(name: str, body: dict) -> None:
        codes[name] = httpx.post(url, json=body, timeout=120).status_code

    held.hold_image = True
    served = threading.Thread(target=send, args=("served", image))
    served.start()
    assert held.holding.wait(60) and held.engine.busy
    waiting = threading.Thread(target=send, args=("waiting", text))
    waiting.start()
    wait_for(lambda: held.engine.queued == 1)
    full = httpx.post(url, json=text, timeout=60)
    err = assert_error(full, 503, "queue_full")
    assert err["type"] == "server_error" and 1 <= int(full.headers["retry-after"]) <= 60
    held.release()
    served.join(timeout=120)
    waiting.join(timeout=120)
    assert codes == {"served": 200, "waiting": 200}
    assert httpx.post(url, json=text, timeout=60).status_code == 200      # the server is fine


def test_disconnect_mid_stream_leaves_no_half_turn(held, image_url):
    """A client drops a streamed follow-up after 3 tokens: the generation stops, the cut turn is not kept,
    and the same follow-up again starts from the kept first turn (no re-encode) and says the same."""
    client = openai.OpenAI(base_url=held.url + "/v1", api_key="none", max_retries=0, timeout=120)
    msgs = [user("describe this image", image_url)]
    r1 = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=4)
    follow = msgs + [{"role": "assistant", "content": r1.choices[0].message.content}, user("and the color")]
    e = held.engine
    turns, kept, chunks = e.turns, e.cache.stats()["conversations"], e.media_chunks_encoded

    held.hold_after = 3
    got = []
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", held.url + "/v1/chat/completions",
                      json={"model": MODEL_ID, "messages": follow, "max_tokens": 200, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                    if len(got) == 4:      # the role chunk and 3 tokens: the worker is held now
                        break
    assert held.holding.wait(60)
    wait_for(lambda: e.current_cancelled)          # the server saw the client go
    held.release()
    wait_for(lambda: not e.busy)
    assert e.turns == turns and e.cache.stats()["conversations"] == kept     # nothing of the cut turn kept

    r2 = client.chat.completions.create(model=MODEL_ID, messages=follow, max_tokens=12)
    x = ext(r2)
    assert x["cache"] == "hit" and x["reused_messages"] == 2 and x["media_chunks_encoded"] == 0
    assert e.media_chunks_encoded == chunks
    assert r2.choices[0].message.content.startswith("".join(got))   # greedy, same state: same start
    assert len("".join(got)) > 0


def test_the_request_question_is_the_probe_of_its_early_compaction(tiny_pairs, image_url, monkeypatch):
    """Two 256-token images in a 512-cell context: the first is compacted before the second is read, so
    before the question is in the cache. The request's question is known then and is the probe (its own
    text); a request without text gets the generic probe, and no request inherits another's."""
    from test_probe import spy_probes

    seen = spy_probes(monkeypatch)
    h = Held(tiny_pairs, n_ctx=512)
    try:
        client = openai.OpenAI(base_url=h.url + "/v1", api_key="none", max_retries=0, timeout=120)
        s = h.engine.session
        q = "what colour is the box"
        want = h.model.tokenize(q, add_bos=False, special=False)
        for text, probe in ((q, q), ("", True)):
            seen.clear()
            client.chat.completions.create(model=MODEL_ID, messages=[user(text, image_url, image_url)],
                                           max_tokens=2)
            wait_for(lambda: not h.engine.busy)
            early = [r for r in s.reports if r.early]
            assert early, s.reports
            assert [p for p, _, _ in seen] == [probe] * len(early)
            assert s.probe is True                     # the session's default is back for the next request
            if probe is True:
                assert all(r.probe == "generic" for r in early) and not any(k for _, _, k in seen)
            else:
                assert all(r.probe == "question" and r.info["probe_tokens"] == len(want) for r in early)
                assert all(toks == want for _, toks, _ in seen)
    finally:
        h.close()


def test_a_video_turn_streams_the_clip_and_a_follow_up_reuses_it(server, client, tmp_path):
    """A `video_url` part (a data: URL of an mp4): the clip is streamed frame by frame and compacted chunk by
    chunk in the server's context, the edgekv field sums every chunk's compaction, the follow-up is a cache
    hit that encodes nothing again; a file that is not a video is one 400."""
    from test_video import make_clip

    clip = make_clip(tmp_path / "clip.mp4", n=4, fps=2, w=224, h=224)
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    encodes0 = server.health()["media_chunks_encoded"]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what happens?"},
                                         {"type": "video_url", "video_url": {"url": url}}]}]
    r1 = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=4)
    e1 = ext(r1)
    chunks = server.health()["media_chunks_encoded"] - encodes0
    assert e1["cache"] == "miss" and chunks >= 2                     # 2 s at 2 fps: several frames
    assert e1["cells_before"] - e1["cells_after"] == chunks * (256 - 64)   # snapkv 0.25 of every frame's 256
    assert r1.usage.prompt_tokens > chunks * 256 > e1["kv_cells"]
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "and then?"}]
    e2 = ext(client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=2))
    assert e2["cache"] == "hit" and e2["media_chunks_encoded"] == 0

    png = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"
                                             + base64.b64encode(_png(8, 8)).decode()}}
    r = post(server, {"model": MODEL_ID, "messages": [{"role": "user", "content": [png]}], "max_tokens": 2})
    assert_error(r, 400, "invalid_video")


def test_recall_keeps_a_conversations_store_and_drops_it_with_the_conversation(tiny_pairs, tmp_path):
    """With --recall disk each kept conversation keeps its store: its follow-up chooses again among every
    compacted cell (edgekv.recall), and a conversation
    that is not kept (its store over the disk cap) leaves no file behind once the session moves on."""
    import openai

    folder = tmp_path / "recall"
    for disk_cap, kept in ((None, True), (1, False)):    # a 1-byte --recall-disk-mb cap keeps none
        h = Held(tiny_pairs, engine=dict(method="snapkv", queue_size=1, recall="disk", recall_dir=str(folder),
                                         recall_disk_bytes=disk_cap))
        try:
            c = openai.OpenAI(base_url=h.url + "/v1", api_key="x", max_retries=0, timeout=120)
            msgs = [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                                 {"type": "image_url", "image_url": {"url": data_url(h.image.read_bytes())}}]}]
            r1 = c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=2)
            e1 = ext(r1)
            assert e1["kept"] is kept and e1["recall"]["mode"] == "disk" and e1["recall"]["store_cells"] > 0
            assert e1["recall"]["store_cells"] >= e1["cells_before"] - e1["cells_after"]   # every evicted cell
            if kept:
                msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "and the top left corner, in detail?"}]
                e2 = ext(c.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=2))
                assert e2["cache"] == "hit" and e2["recall"]["reselected"] and e2["recall"]["error"] is None
                assert 0 <= e2["recall"]["share"] <= 1       # what came back (or would have): the gate's measure
                assert e2["recall"]["store_cells"] >= e1["recall"]["store_cells"]
            else:
                files = set(folder.iterdir())
                assert len(files) == 1                      # the live conversation's store
                other = [{"role": "user", "content": "hello there"}]
                c.chat.completions.create(model=MODEL_ID, messages=other, max_tokens=2)
                assert not (files & set(folder.iterdir()))   # the first one's file went with it
        finally:
            h.close()
    assert not list(folder.iterdir())                       # closing the server removed the rest
