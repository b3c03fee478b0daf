"""The chat page of `edgekv serve` (edgekv/server/webui) driven in a real browser: Debian's chromium and
chromedriver through selenium, against a live server (uvicorn in a thread, tiny llava pair, --api-key).

The answers the page draws are checked against what the server sent over the wire: a script injected
before the page's own wraps window.fetch and keeps each request body and each raw SSE stream, so the
memory bars are compared with the `edgekv` field of the response, not with the page's own copy.

Where chromium is missing the browser tests skip with the reason; under CI (env CI=true, .ci/run installs
chromium) they fail instead. Screenshots go to tmp_path, or to $EDGEKV_WEBUI_SHOTS (docs/webui/ for the
README: EDGEKV_WEBUI_SHOTS=docs/webui pytest tests/test_webui.py)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from conftest import THREADS
from test_serve import MODEL_ID, Held

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

KEY = "sk-webui-test"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Runs in the page before its own scripts: keeps what went over the wire for the test to compare with.
RECORD_FETCH = """
(() => {
  const orig = window.fetch;
  window.__requests = []; window.__responses = [];
  window.fetch = async function (input, init) {
    const url = typeof input === "string" ? input : input.url;
    const chat = url.includes("v1/chat/completions");
    if (chat) window.__requests.push(JSON.parse(init.body));
    const resp = await orig.apply(this, arguments);
    if (chat) {
      const rec = { status: resp.status, text: null };
      window.__responses.push(rec);
      resp.clone().text().then((t) => { rec.text = t; }, (e) => { rec.text = "ABORTED " + e.name; });
    }
    return resp;
  };
})();
"""


def unavailable(reason: str):
    """No browser here: a skip with the reason, but a failure in CI, where .ci/run installs chromium."""
    if IN_CI:
        pytest.fail(f"CI=true and the browser test cannot run: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class LiveServer(Held):
    """test_serve's in-process server with the API key and the page's defaults (snapkv at 0.25, 64 tokens).
    The worker can be held after a number of answer records or inside an image's prefill, so "Stop
    mid-answer" and "the answer streams" are exact states, not races against a fast tiny model."""

    def __init__(self, tiny_pairs) -> None:
        super().__init__(tiny_pairs, n_ctx=2048, engine=dict(method="snapkv", budget=0.25, max_tokens=64),
                         app=dict(api_key=KEY))


@pytest.fixture(scope="module")
def live(tiny_pairs):
    s = LiveServer(tiny_pairs)
    yield s
    s.close()


def start_browser(width: int = 1280, height: int = 1000):
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        unavailable("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(arg)
    try:   # the system's chromedriver, named: selenium must not try to download one
        d = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    except WebDriverException as e:
        unavailable(f"chromium did not start: {e.msg}")
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_FETCH})
    return d


@pytest.fixture()
def browser():
    d = start_browser()
    yield d
    d.quit()


@pytest.fixture()
def shots(tmp_path) -> Path:
    out = Path(os.environ.get("EDGEKV_WEBUI_SHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def sse_chunks(text: str) -> list[dict]:
    """The JSON objects of a raw SSE body, [DONE] left out."""
    out = []
    for event in text.split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: ") and line[6:] != "[DONE]":
                out.append(json.loads(line[6:]))
    return out


def last_response(d) -> tuple[str, dict, dict]:
    """(streamed text, edgekv field, usage) of the page's last chat request, read from the wire."""
    last = "const r = window.__responses[window.__responses.length - 1]; return r && r.text !== null && r;"
    rec = wait_for(lambda: d.execute_script(last), what="the recorded response body")
    assert rec["status"] == 200, rec
    chunks = sse_chunks(rec["text"])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    final = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(final) == 1 and len(usage) == 1, chunks[-3:]
    return text, final[0]["edgekv"], usage[0]


def idle(d) -> None:
    wait_for(lambda: d.execute_script("return !document.body.classList.contains('busy')"), what="the page idle")


def last_answer(d):
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, "#log li.msg.assistant")[-1]


def bars(answer) -> dict:
    """The memory figure of an answer: its data attributes and each bar's value, track and drawn width."""
    from selenium.webdriver.common.by import By

    fig = answer.find_element(By.CSS_SELECTOR, "figure.mem")
    attrs = {k: fig.get_attribute(f"data-{k}") for k in
             ("cells-full", "cells-before", "cells-after", "bytes-before", "bytes-after", "kv-cells", "method")}
    rows = {}
    for row in fig.find_elements(By.CSS_SELECTOR, ".bar-row"):
        fill = row.find_element(By.CSS_SELECTOR, ".fill")
        track = row.find_element(By.CSS_SELECTOR, ".track")
        rows[row.get_attribute("data-bar")] = (float(row.get_attribute("data-value")),
                                               float(row.get_attribute("data-full")),
                                               fill.rect["width"] / track.rect["width"])
    return {"attrs": attrs, "rows": rows}


def check_bars(answer, x: dict, usage: dict, cell_bytes: int) -> None:
    """The bars show the response's numbers, drawn to scale against the full (uncompacted) cache: every
    token of the conversation in its own cell (usage.total_tokens), at the model's bytes per cell."""
    b = bars(answer)
    a, rows = b["attrs"], b["rows"]
    full = max(usage["total_tokens"], x["cells_before"], x["kv_cells"])
    full_bytes = max(full * cell_bytes, x["bytes_before"])
    for name, track in (("before", full), ("after", full), ("now", full), ("bytes-before", full_bytes),
                        ("bytes-after", full_bytes), ("kept", full_bytes)):
        assert rows[name][1] == pytest.approx(track), (name, rows[name], track)
    assert int(a["cells-full"]) == full
    assert (int(a["cells-before"]), int(a["cells-after"]), int(a["kv-cells"])) == \
        (x["cells_before"], x["cells_after"], x["kv_cells"])
    assert (int(a["bytes-before"]), int(a["bytes-after"])) == (x["bytes_before"], x["bytes_after"])
    assert a["method"] == x["method"]
    for name, value in (("before", x["cells_before"]), ("after", x["cells_after"]), ("now", x["kv_cells"]),
                                        ("bytes-before", x["bytes_before"]), ("bytes-after", x["bytes_after"]),
                        ("kept", x["kept_bytes"])):
        got, track, drawn = rows[name]
        assert got == value, (name, got, value)
        assert drawn == pytest.approx(min(1.0, value / track), abs=0.01), (name, drawn, value, track)
    assert rows["full"][0] == full and rows["full"][2] == pytest.approx(1.0, abs=0.01)


def send(d, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)          # the keyboard sends


def test_chat_page_in_a_browser(browser, live, shots):
    """Page load, a wrong key, an image turn streamed, a follow-up hit, Stop mid-answer then a further
    turn, conversations kept across a reload, a narrow window: each state checked and photographed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d, e = browser, live.engine
    d.get(live.url + "/")
    assert d.title == "edgekv chat"
    err = d.find_element(By.ID, "error")
    wait_for(lambda: err.is_displayed(), what="the missing-key error")   # /v1/edgekv/info needs the key
    assert "401" in err.text

    key = d.find_element(By.ID, "api-key")
    key.send_keys(KEY, Keys.TAB)
    assert d.switch_to.active_element == d.find_element(By.ID, "new-conv")     # focus order: key, then the list
    wait_for(lambda: not err.is_displayed(), what="the error to clear")
    assert "tiny-llava" in d.find_element(By.ID, "model-name").text
    options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#method option")]
    assert "snapkv" in options and "full" in options
    assert d.find_element(By.ID, "method").get_attribute("value") == "snapkv"
    d.save_screenshot(str(shots / "page-load.png"))
    max_tokens = d.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")

    # An image turn, held after 3 answer records: the page shows the partial answer while it streams.
    d.find_element(By.ID, "files").send_keys(str(live.image))
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#attachments img"), what="the attachment preview")
    live.hold(3)
    send(d, "describe this image")
    assert live.holding.wait(60)
    streaming = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#log li.msg.assistant.streaming"), what="streaming")
    wait_for(lambda: streaming[0].find_element(By.CSS_SELECTOR, ".text").text, what="streamed text")
    assert d.find_element(By.ID, "stop").is_enabled() and not d.find_element(By.ID, "send").is_enabled()
    assert not d.find_element(By.CSS_SELECTOR, "#conv-list button.conv").is_enabled()   # no switching mid-answer
    d.save_screenshot(str(shots / "streaming.png"))
    live.release()
    idle(d)
    text, x, usage = last_response(d)
    answer = last_answer(d)
    assert answer.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == text and text
    assert x["cache"] == "miss" and x["images_encoded"] == 1 and x["method"] == "snapkv"
    assert x["cells_after"] < x["cells_before"]                 # the image was compacted
    assert answer.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-cache") == "miss"
    check_bars(answer, x, usage, live.model.cell_bytes)
    req = d.execute_script("return window.__requests[window.__requests.length - 1]")
    assert req["stream"] is True and req["edgekv"] == {"method": "snapkv", "budget": "0.25"}
    assert req["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    d.save_screenshot(str(shots / "image-turn.png"))

    # A follow-up: the server restores the kept conversation, and the page says so.
    send(d, "and what colour is it?")
    idle(d)
    text2, x2, usage2 = last_response(d)
    answer = last_answer(d)
    assert x2["cache"] == "hit" and x2["reused_messages"] == 2 and x2["images_encoded"] == 0
    badge = answer.find_element(By.CSS_SELECTOR, ".badge")
    assert badge.get_attribute("data-cache") == "hit" and "cache hit" in badge.text
    check_bars(answer, x2, usage2, live.model.cell_bytes)
    d.save_screenshot(str(shots / "follow-up-hit.png"))

    # A wrong key: the chat request gets 401, the page says so and gives the message back to the box.
    key.clear()
    key.send_keys("sk-wrong", Keys.TAB)
    send(d, "hello")
    wait_for(lambda: "Wrong or missing API key (401)" in err.text, what="the wrong-key error")
    assert d.execute_script("const r = window.__responses; return r[r.length - 1].status") == 401
    assert d.find_element(By.ID, "prompt").get_attribute("value") == "hello"
    assert len(d.find_elements(By.CSS_SELECTOR, "#log li.msg")) == 4      # nothing added to the conversation
    d.save_screenshot(str(shots / "wrong-key.png"))
    key.clear()
    key.send_keys(KEY, Keys.TAB)
    wait_for(lambda: not err.is_displayed(), what="the error to clear")
    d.find_element(By.ID, "prompt").clear()

    # Stop mid-answer with Esc: the server cancels the turn, the partial answer stays in the page...
    turns, kept = e.turns, e.cache.stats()["conversations"]
    max_tokens.clear()
    max_tokens.send_keys("200")
    live.hold(3)
    send(d, "tell me more")
    assert live.holding.wait(60)
    wait_for(lambda: last_answer(d).find_element(By.CSS_SELECTOR, ".text").text, what="streamed text")
    d.find_element(By.ID, "prompt").send_keys(Keys.ESCAPE)
    wait_for(lambda: e.current_cancelled, what="the server to cancel")
    live.release()
    idle(d)
    wait_for(lambda: not e.busy, what="the worker")
    assert e.turns == turns and e.cache.stats()["conversations"] == kept    # the cut turn is not kept
    stopped = last_answer(d)
    partial = stopped.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
    assert stopped.get_attribute("data-stopped") == "true" and partial
    assert "Stopped" in stopped.text
    d.save_screenshot(str(shots / "stopped.png"))

    # ...and goes to the server as history with the next turn, which restores the two finished turns.
    max_tokens.clear()
    max_tokens.send_keys("8")
    send(d, "thanks")
    idle(d)
    _, x3, usage3 = last_response(d)
    req = d.execute_script("return window.__requests[window.__requests.length - 1]")
    assert [m["role"] for m in req["messages"]] == ["user", "assistant"] * 3 + ["user"]
    assert req["messages"][5] == {"role": "assistant", "content": partial}
    assert x3["cache"] == "hit" and x3["reused_messages"] == 4
    check_bars(last_answer(d), x3, usage3, live.model.cell_bytes)

    # Several conversations, kept in the browser: a new one, back to the first, and a reload.
    d.find_element(By.ID, "new-conv").click()
    assert d.find_elements(By.CSS_SELECTOR, "#log li.msg") == []
    assert d.switch_to.active_element == d.find_element(By.ID, "prompt")
    send(d, "a second conversation")
    idle(d)
    d.refresh()
    items = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#conv-list button.conv"), what="the list")
    assert len(items) == 2 and "a second conversation" in items[0].text
    assert len(d.find_elements(By.CSS_SELECTOR, "#log li.msg")) == 2
    items[1].click()
    msgs = d.find_elements(By.CSS_SELECTOR, "#log li.msg")
    assert len(msgs) == 8 and msgs[0].find_elements(By.CSS_SELECTOR, ".images img")
    assert msgs[5].get_attribute("data-stopped") == "true"
    d.execute_script("document.querySelector('#log li.msg.assistant:nth-child(2)').scrollIntoView()")
    d.save_screenshot(str(shots / "conversations.png"))

    # A narrow window: nothing sticks out sideways, the composer is still there.
    d.set_window_size(400, 900)
    wait_for(lambda: d.execute_script("return window.innerWidth") <= 420, what="the resize")
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    d.execute_script("document.querySelector('#log li.msg.assistant figure.mem').scrollIntoView()")
    assert d.execute_script("return window.scrollY") > 0       # the page scrolled to the figure...
    assert d.execute_script(                                   # ...and the composer stayed on screen (sticky)
        "const r = document.getElementById('send').getBoundingClientRect(); "
        "return r.top >= 0 && r.bottom <= window.innerHeight + 1")
    d.save_screenshot(str(shots / "narrow.png"))
    assert not [m for m in d.get_log("browser") if m["level"] == "SEVERE" and "/v1/" not in m["message"]
                and "favicon" not in m["message"]]


def test_stop_before_the_first_token(browser, live):
    """Stop while the image is still being prefilled: nothing is added to the conversation and the message
    with its image goes back into the box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d, e = browser, live.engine
    d.get(live.url + "/")
    d.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
    wait_for(lambda: "tiny-llava" in d.find_element(By.ID, "model-name").text, what="the model name")
    d.find_element(By.ID, "files").send_keys(str(live.image))
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#attachments img"), what="the attachment")
    live.hold(image=True)
    send(d, "what is this?")
    assert live.holding.wait(60)
    d.find_element(By.ID, "stop").click()
    idle(d)
    live.release()
    wait_for(lambda: not e.busy, what="the worker")
    assert d.find_elements(By.CSS_SELECTOR, "#log li.msg") == []
    assert d.find_element(By.ID, "prompt").get_attribute("value") == "what is this?"
    assert len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1
    assert "Stopped before the answer started" in d.find_element(By.ID, "status").text


def test_a_request_dropped_before_its_first_token_is_cancelled(live):
    """What the page's Stop relies on before the answer starts: the client goes, the server cancels."""
    import base64

    e = live.engine
    url = "data:image/png;base64," + base64.b64encode(live.image.read_bytes()).decode()
    body = {"model": MODEL_ID, "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    live.hold(image=True)
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(live.url + "/v1/chat/completions", json=body, timeout=1,
                       headers={"Authorization": f"Bearer {KEY}"})
        wait_for(lambda: e.current_cancelled, timeout=3, what="the server to cancel")
    finally:
        live.release()
        wait_for(lambda: not e.busy, what="the worker")


DROP_AND_PASTE = """
const [b64, kind] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], kind + ".png", { type: "image/png" }));
const target = document.getElementById(kind === "dropped" ? "log" : "prompt");
target.dispatchEvent(kind === "dropped"
  ? new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true })
  : new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true }));
"""


def test_attach_by_drop_and_paste_and_a_video(browser, live, tmp_path):
    """Images dropped on the page or pasted are attached byte for byte (the server's conversation cache
    compares media by sha256); a video from the picker is attached as a video, sent as a `video_url` part,
    and the server streams it: the answer comes with every chunk's compaction summed."""
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from test_video import make_clip

    d = browser
    d.get(live.url + "/")
    d.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
    wait_for(lambda: "tiny-llava" in d.find_element(By.ID, "model-name").text, what="the model name")
    b64 = base64.b64encode(live.image.read_bytes()).decode()
    for kind in ("dropped", "pasted"):
        d.execute_script(DROP_AND_PASTE, b64, kind)
    imgs = wait_for(lambda: (lambda x: len(x) == 2 and x)(d.find_elements(By.CSS_SELECTOR, "#attachments img")),
                    what="two attachments")
    assert [i.get_attribute("alt") for i in imgs] == ["attached: dropped.png", "attached: pasted.png"]
    assert all(i.get_attribute("src") == "data:image/png;base64," + b64 for i in imgs)
    while d.find_elements(By.CSS_SELECTOR, "#attachments button.remove"):   # the video alone next
        d.find_element(By.CSS_SELECTOR, "#attachments button.remove").click()

    clip = make_clip(tmp_path / "clip.mp4", n=4, fps=2, w=224, h=224)
    d.find_element(By.ID, "files").send_keys(str(clip))
    video = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#attachments video"), what="the video attachment")[0]
    assert video.get_attribute("aria-label") == "attached: clip.mp4"
    assert video.get_attribute("src") == "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    send(d, "what happens in the clip?")
    idle(d)
    req = d.execute_script("return window.__requests[window.__requests.length - 1]")
    assert [p["type"] for p in req["messages"][-1]["content"]] == ["text", "video_url"]
    text, x, usage = last_response(d)
    assert x["cache"] == "miss" and x["media_chunks_encoded"] >= 2
    assert x["cells_before"] - x["cells_after"] == x["media_chunks_encoded"] * (256 - 64)   # snapkv 0.25, per frame
    assert d.find_elements(By.CSS_SELECTOR, "#log li.msg.user video")


FILL_STORAGE = """
const [n] = arguments;   // characters of each (fake) image
localStorage.clear();
const conv = (id, updated, c) => ({ id, title: id, method: "snapkv", budget: "0.25", maxTokens: 8, updated,
  messages: [{ role: "user", text: id, images: [{ url: "data:image/png;base64," + c.repeat(n), name: id + ".png" }] },
             { role: "assistant", text: "ok" }] });
localStorage.setItem("edgekv.webui.conversations", JSON.stringify([conv("newer", 2, "B"), conv("older", 1, "A")]));
localStorage.setItem("edgekv.webui.current", "newer");
let lo = 0, hi = 40000000;   // fill the rest of the quota but a few characters
while (hi - lo > 16) {
  const mid = Math.floor((lo + hi) / 2);
  try { localStorage.setItem("junk", "j".repeat(mid)); lo = mid; } catch (e) { hi = mid; }
}
localStorage.setItem("junk", "j".repeat(lo));
"""


def test_full_storage_drops_the_oldest_images_from_the_stored_copy(browser, live):
    """localStorage full: the stored copy of the oldest conversation loses its images first, the open one
    keeps them; this tab keeps them all (a follow-up sends the same images, so it is still a cache hit)."""
    from selenium.webdriver.common.by import By

    d = browser

    def stored() -> dict:
        convs = d.execute_script("return JSON.parse(localStorage.getItem('edgekv.webui.conversations'))")
        return {c["id"]: len(c["messages"][0]["images"]) for c in convs if c["messages"]}

    def open_conv(title: str) -> None:
        [b for b in d.find_elements(By.CSS_SELECTOR, "#conv-list button.conv") if title in b.text][0].click()

    d.get(live.url + "/")
    d.execute_script(FILL_STORAGE, 1_000_000)
    d.refresh()
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#conv-list button.conv"), what="the list")
    d.find_element(By.ID, "new-conv").click()          # saving one more conversation overflows the quota
    assert stored() == {"newer": 1, "older": 0}
    assert "storage is full" in d.find_element(By.ID, "status").text
    open_conv("older")                                 # this tab still has its image; now it is the open one
    assert d.find_elements(By.CSS_SELECTOR, "#log li.msg .images img")
    assert stored() == {"newer": 0, "older": 1}
    d.refresh()
    assert d.find_elements(By.CSS_SELECTOR, "#log li.msg .images img")
    open_conv("newer")
    assert not d.find_elements(By.CSS_SELECTOR, "#log li.msg .images img")
    assert "1 image(s) dropped" in d.find_element(By.ID, "log").text


def test_a_kept_turn_shows_its_numbers_and_recall_once_the_server_sends_it(browser, live):
    """A turn read back from localStorage draws the same picture; recall numbers, which the server does not
    send yet, are shown when the `edgekv` field carries them (here a stored field that has them)."""
    from selenium.webdriver.common.by import By

    x = {"cache": "miss", "reused_messages": 0, "cached_tokens": 0, "images_encoded": 1, "media_chunks_encoded": 1,
         "method": "snapkv", "budget": 0.25, "cells_before": 300, "cells_after": 100, "bytes_before": 153600,
         "bytes_after": 51200, "kv_cells": 120, "kept": True, "kept_bytes": 70000, "compaction_s": 0.01,
         "timings": {"queue_s": 0.0, "restore_s": 0.0, "first_token_s": 0.1, "generate_s": 0.2, "keep_s": 0.0},
         "recall": {"cells_recalled": 12, "store_bytes": 4096}}
    usage = {"prompt_tokens": 310, "completion_tokens": 10, "total_tokens": 320,
             "prompt_tokens_details": {"cached_tokens": 0}}
    conv = {"id": "k", "title": "kept", "method": "snapkv", "budget": "0.25", "maxTokens": 8, "updated": 1,
            "messages": [{"role": "user", "text": "hi", "images": []},
                         {"role": "assistant", "text": "hello",
                          "stats": {"ttft_ms": 50, "total_ms": 300, "usage": usage, "edgekv": x, "finish": "stop"}}]}
    d = browser
    d.get(live.url + "/")
    d.execute_script("localStorage.setItem('edgekv.webui.conversations', JSON.stringify([arguments[0]]));"
                     "localStorage.setItem('edgekv.webui.current', 'k');", conv)
    d.refresh()
    answer = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#log li.msg.assistant"), what="the answer")[0]
    check_bars(answer, x, usage, live.model.cell_bytes)
    text = answer.text
    assert "recall cells recalled\n12" in text and "recall store bytes\n4096" in text, text
    assert "300 → 100 cells (−67 %)" in text and "10 tokens: 45.0 tok/s" in text   # 9 tokens after the first, 0.2 s


def test_page_is_open_the_api_is_not(live):
    """GET / and its files need no key (they hold no data); /v1/edgekv/info is API and needs it."""
    for path, kind in (("/", "text/html"), ("/webui/app.js", "text/javascript"), ("/webui/style.css", "text/css")):
        r = httpx.get(live.url + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (path, r.status_code)
    assert "default-src 'none'" in httpx.get(live.url + "/", timeout=10).headers["content-security-policy"]
    assert httpx.get(live.url + "/v1/edgekv/info", timeout=10).status_code == 401
    r = httpx.get(live.url + "/v1/edgekv/info", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    info = r.json()
    assert info["model"] == MODEL_ID and info["cell_bytes"] == live.model.cell_bytes and info["images"] is True
    assert info["method"] == "snapkv" and "snapkv" in info["methods"] and info["video"] is True


def test_no_webui_flag(tiny_pairs, monkeypatch):
    """`edgekv serve --no-webui` builds an app without the page (uvicorn.run is where it is caught)."""
    import uvicorn
    from click.testing import CliRunner
    from starlette.testclient import TestClient

    from edgekv.cli.main import cli

    model, mmproj, _ = tiny_pairs["llava"]
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    for flag in ([], ["--no-webui"]):
        r = CliRunner().invoke(cli, ["serve", "-m", str(model), "--mmproj", str(mmproj), "-t", str(THREADS),
                                      "-c", "512", "-fa", "off", "--port", str(free_port()), *flag])
        assert r.exit_code == 0, r.output
    with_page, without = (TestClient(a, base_url="http://127.0.0.1") for a in apps)   # a Host the server accepts
    assert with_page.get("/").status_code == 200 and with_page.get("/webui/app.js").status_code == 200
    assert without.get("/").status_code == 404 and without.get("/webui/app.js").status_code == 404
    assert without.get("/v1/edgekv/info").status_code == 404
