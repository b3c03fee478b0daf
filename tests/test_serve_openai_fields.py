"""OpenAI fields that were silently ignored: logprobs/top_logprobs and response_format (JSON through
llama.cpp's grammar sampler), on a live `edgekv serve` driven by the official openai client."""
from __future__ import annotations

import json
import math

import pytest

from test_serve import MODEL_ID, client, server  # noqa: F401 - the live server fixtures

openai = pytest.importorskip("openai")
MSGS = [{"role": "user", "content": "say something"}]


def test_logprobs_and_top_logprobs(client):  # noqa: F811
    r = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=8, logprobs=True, top_logprobs=5)
    content = r.choices[0].message.content
    entries = r.choices[0].logprobs.content
    assert entries and len(entries) <= r.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == content
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops)
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-6
        assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(tops[0])   # greedy: the top one
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=8, logprobs=True,
                                                top_logprobs=5, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed += c.logprobs.content or []
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in entries]
    plain = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=8)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, top_logprobs=3)


def test_response_format_json_schema_is_followed(client):  # noqa: F811
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2]}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL_ID, messages=MSGS, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2)


def test_response_format_json_object(client):  # noqa: F811
    r = client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=30,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{"), text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
