"""Clients that leave, kept states that fail, internal errors and shutdown, on a live in-process server
(uvicorn on 127.0.0.1, tests/test_serve.py's Held: the worker is held at a known point, the llama.cpp
work is real). Outcomes are read from the engine's counters, never from log text."""
from __future__ import annotations

import dataclasses
import http.client
import json
import threading

import httpx
import pytest

from test_serve import MODEL_ID, Held, assert_error, user, wait_for

pytest.importorskip("fastapi")


@pytest.fixture()
def held(tiny_pairs):
    h = Held(tiny_pairs)
    yield h
    h.close()


@pytest.fixture(scope="module")
def image_url(tiny_pairs) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(tiny_pairs["llava"][2].read_bytes()).decode()


def open_request(held, body: dict) -> http.client.HTTPConnection:
    """Send a request and return without reading the answer: closing the connection is a client leaving."""
    conn = http.client.HTTPConnection("127.0.0.1", held.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def test_a_client_that_leaves_during_the_prefill_stops_it(held, image_url):
    """Two images; the worker is held inside the first one's prefill when the client closes its
    connection. The server notices (before the fix it never did: is_disconnected() stayed false under
    BaseHTTPMiddleware), the prefill stops, nothing is kept and the second image is never encoded."""
    e = held.engine
    held.hold_image = True
    conn = open_request(held, {"model": MODEL_ID, "messages": [user("describe", image_url, image_url)],
                               "max_tokens": 4})
    assert held.holding.wait(60)
    conn.close()
    wait_for(lambda: e.current_cancelled, timeout=10)
    held.release()
    wait_for(lambda: not e.busy)
    assert e.cancelled_turns == 1 and e.turns == 0 and len(e.cache) == 0
    assert e.media_chunks_encoded == 1                  # the second image was not encoded
    r = httpx.post(held.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL_ID, "messages": [user("hi")], "max_tokens": 2})
    assert r.status_code == 200 and e.turns == 1


def test_a_request_whose_client_left_while_queued_is_not_run(held, image_url):
    e = held.engine
    held.hold_image = True
    codes = []
    first = threading.Thread(target=lambda: codes.append(httpx.post(
        held.url + "/v1/chat/completions", timeout=120,
        json={"model": MODEL_ID, "messages": [user("describe", image_url)], "max_tokens": 2}).status_code))
    first.start()
    assert held.holding.wait(60)
    conn = open_request(held, {"model": MODEL_ID, "messages": [user("hi")], "max_tokens": 2})
    wait_for(lambda: e.queued == 1)
    waiting = list(e._queue.queue)[0]
    conn.close()
    wait_for(lambda: waiting.cancelled.is_set(), timeout=10)    # seen while it waited
    held.release()
    first.join(timeout=120)
    wait_for(lambda: not e.busy and not e.queued)
    assert codes == [200]
    assert e.skipped == 1 and e.turns == 1                 # the abandoned request never ran


def test_a_kept_conversation_that_does_not_restore_is_dropped_and_prefilled_again(held, image_url):
    """The kept state of a conversation is damaged (llama.cpp refuses it): the follow-up is answered from
    a fresh prefill (before: 400 on this and every later follow-up, the entry kept)."""
    e = held.engine
    url = held.url + "/v1/chat/completions"
    msgs = [user("describe this", image_url)]
    r1 = httpx.post(url, json={"model": MODEL_ID, "messages": msgs, "max_tokens": 3}, timeout=60).json()
    follow = msgs + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]}, user("the colour?")]
    # another conversation in between, so the follow-up must restore the kept state
    httpx.post(url, json={"model": MODEL_ID, "messages": [user("other")], "max_tokens": 1}, timeout=60)
    key = next(k for k in e.cache._entries if k[1][0][1].endswith("describe this"))   # (tenant, messages)
    kept = e.cache._entries[key]
    e.cache._entries[key] = dataclasses.replace(kept, snapshot=dataclasses.replace(
        kept.snapshot, blob=kept.snapshot.blob[: len(kept.snapshot.blob) // 2]))
    r2 = httpx.post(url, json={"model": MODEL_ID, "messages": follow, "max_tokens": 3}, timeout=60)
    assert r2.status_code == 200, r2.text
    x = r2.json()["edgekv"]
    assert x["cache"] == "miss" and x["images_encoded"] == 1 and e.restore_failures == 1
    assert key not in e.cache._entries
    more = follow + [{"role": "assistant", "content": r2.json()["choices"][0]["message"]["content"]}, user("and?")]
    r3 = httpx.post(url, json={"model": MODEL_ID, "messages": more, "max_tokens": 2}, timeout=60)
    assert r3.status_code == 200 and r3.json()["edgekv"]["cache"] == "hit"


def test_an_internal_failure_is_a_500(held, image_url):
    """llama.cpp refusing a compacted state is the server's failure, not the request's: 500, no details."""
    from edgekv.errors import CompactionError

    def refuse(*a, **kw):
        raise CompactionError("llama.cpp refused the compacted state")

    held.engine.session.compact = refuse
    r = httpx.post(held.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL_ID, "messages": [user("describe", image_url)], "max_tokens": 2})
    err = assert_error(r, 500, "internal_error")
    assert err["type"] == "server_error" and "llama.cpp" not in err["message"]


def test_shutdown_waits_for_the_worker_before_freeing(held, image_url):
    """A worker held inside an image's prefill (an encode cannot be aborted) is not freed under: close()
    says it has not stopped, nothing is freed, and a later close() frees once it is out."""
    e = held.engine
    held.hold_image = True
    t = threading.Thread(target=lambda: httpx.post(
        held.url + "/v1/chat/completions", timeout=120,
        json={"model": MODEL_ID, "messages": [user("describe", image_url)], "max_tokens": 2}))
    t.start()
    assert held.holding.wait(60)
    assert e.close(timeout=0.5) is False
    assert not e.session._closed and not held.model.closed
    held.release()
    assert e.close(timeout=60) is True and e.session._closed
    assert e.cancelled_turns == 1
    t.join(timeout=60)
