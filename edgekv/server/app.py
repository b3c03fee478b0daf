"""The FastAPI app: /v1/chat/completions (SSE stream or one JSON), /v1/models, /health.

Every failure a client can cause answers 4xx with OpenAI's error body; a bug answers 500 with the same
shape and the traceback goes to the server log, never to the client."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekv.errors import BudgetError, ContextOverflowError, EdgeKVError, MediaError
from edgekv.server.engine import ConvMessage, Engine, Job, QueueFull
from edgekv.server.images import (DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_PIXELS, MAX_VIDEOS, ImageLoader,
                                  ImageRefused)
from edgekv.server.middleware import BodyLimit, Guard
from edgekv.server.schemas import ChatRequest, ImagePart, TextPart, VideoPart, error_body
from edgekv.server.webui import mount as mount_webui

log = logging.getLogger("edgekv.serve")
POLL_S = 0.25   # how often a waiting request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.headers = status, type_, code, param, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.type, self.code, self.param), status_code=self.status,
                            headers=self.headers)


def api_error(e: BaseException) -> APIError:
    """An exception from parsing or from the engine -> the status and body the client gets."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(503, str(e), "server_error", "queue_full", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, ImageRefused):
        return APIError(e.status, str(e), code=e.code, param="messages")
    if isinstance(e, MediaError):
        return APIError(400, str(e), code="invalid_image", param="messages")
    if isinstance(e, BudgetError):
        return APIError(400, str(e), code="invalid_budget", param="edgekv.budget")
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, EdgeKVError):   # InternalError is not one: it falls through to 500
        return APIError(400, str(e), code="invalid_request")
    return APIError(500, "internal server error (details in the server log)", "server_error", "internal_error")


def create_app(engine: Engine, *, api_key: str | tuple[str, ...] | None = None, max_request_bytes: int = 32 << 20,
               images: ImageLoader | None = None, aliases: tuple[str, ...] = (),
               hosts: tuple[str, ...] | None = None, cors_origins: tuple[str, ...] = (), read_timeout: float = 30.0,
               max_images: int = DEFAULT_MAX_IMAGES, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
               webui: bool = True):
    """The ASGI app serving `engine` (Guard outermost: host, origin, key and content type from the headers;
    then the body limit and read timeout; then the routes). hosts: the Host names accepted (None: any).
    `webui` adds the chat page at / (edgekv/server/webui.py; the key guards /v1/ only)."""
    keys = (api_key,) if isinstance(api_key, str) else tuple(api_key or ())
    if any(not k for k in keys):
        raise ValueError("an empty API key would turn authentication off")
    images = images or ImageLoader()
    names = (engine.model_id, *aliases)
    app = FastAPI(title="edgekv", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("request failed")
        return api_error(e).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "edgekv"}
                                           for n in names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            job, req = await _parse(request)
            engine.submit(job)
        except (APIError, EdgeKVError) as e:
            return api_error(e).response()
        try:
            first = await _next_event(job, request)
        except _ClientGone:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if first[0] == "error":
            return api_error(first[1]).response()
        if first[0] == "cancelled":
            return JSONResponse(error_body("cancelled"), status_code=499)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, first, cid, now, req.model, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        event, entries = first, []
        try:
            while event[0] == "token":
                entries += event[1][1] or []
                event = await _next_event(job, request)
        except _ClientGone:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if event[0] != "done":
            return api_error(event[1] if event[0] == "error" else APIError(499, "cancelled")).response()
        res = event[1]
        logprobs = {"content": entries, "refusal": None} if req.logprobs else None
        return {"id": cid, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                             "logprobs": logprobs, "finish_reason": res["finish_reason"]}],
                "usage": res["usage"], "edgekv": res["edgekv"]}

    async def _parse(request: Request) -> tuple[Job, ChatRequest]:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError as e:   # also bad UTF-8, and an integer of more than 4300 digits
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        where = _lone_surrogate(data)
        if where is not None:
            raise APIError(400, f"invalid request: {where or 'body'}: a lone UTF-16 surrogate is not text",
                           code="invalid_json", param=where or None)
        try:
            req = ChatRequest.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise APIError(400, f"invalid request: {where}: {first['msg']}" + (
                f" ({len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""),
                param=where or None) from None
        if req.model not in names:
            raise APIError(404, f"the model {req.model!r} does not exist here; this server serves "
                           f"{', '.join(repr(n) for n in names)}", code="model_not_found", param="model")
        if req.n != 1:
            raise APIError(400, "n must be 1: edgekv answers one choice", param="n")
        _refuse_tools(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        ext = req.edgekv
        method, budget = engine.check_options(ext.method if ext else None, ext.budget if ext else None)
        messages = _messages(req)
        gen: dict[str, Any] = {"max_tokens": req.max_completion_tokens or req.max_tokens or engine.max_tokens}
        if req.temperature is not None:
            gen["temperature"] = req.temperature
        if req.top_p is not None:
            gen["top_p"] = req.top_p
        if req.seed is not None:
            gen["seed"] = req.seed
        if req.stop:
            gen["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if req.logprobs:
            gen["logprobs"] = req.top_logprobs or 0
        grammar = _grammar(req)
        if grammar is not None:
            gen["grammar"] = grammar
        key = request.scope.get("state", {}).get("api_key")
        tenant = hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""   # kept conversations per key
        return Job(messages, gen, method, budget, asyncio.get_running_loop(), tenant=tenant), req

    def _messages(req: ChatRequest) -> list[ConvMessage]:
        out, n_images, n_videos, pixels, text_bytes = [], 0, 0, 0, 0
        for i, m in enumerate(req.messages):
            if m.role in ("tool", "function"):
                raise APIError(400, f"messages[{i}]: role {m.role!r} (a tool result) is not supported: edgekv "
                               "does not call tools", code="unsupported_parameter", param=f"messages.{i}.role")
            role = "system" if m.role == "developer" else m.role
            texts, ims, clips = [], [], []
            if isinstance(m.content, str):
                texts.append(m.content)
            for part in m.content if isinstance(m.content, list) else ():
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif isinstance(part, ImagePart):
                    n_images += 1
                    _check_media(i, role, "image", n_images, max_images, " (--max-images)")
                    im = images.load(part.image_url.url, n_images)
                    pixels += im.pixels(images.max_pixels)   # from the header: nothing decoded yet
                    if pixels > max_request_pixels:
                        raise APIError(400, f"the request's images have more than {max_request_pixels} pixels "
                                       "together (--max-request-pixels)", code="image_too_large", param="messages")
                    ims.append(im)
                elif isinstance(part, VideoPart):
                    n_videos += 1
                    _check_media(i, role, "video", n_videos, MAX_VIDEOS)
                    clips.append(images.load_video(part.video_url.url, n_videos))
            text_bytes += sum(len(t.encode("utf-8")) for t in texts)
            out.append(ConvMessage(role, "\n".join(texts), ims, clips))
        if text_bytes > engine.max_prompt_bytes:   # refused before tokenizing (which takes seconds for MBs)
            raise APIError(400, f"the messages' text ({text_bytes} bytes) cannot fit the context of "
                           f"{engine.model.n_ctx} tokens", code="context_length_exceeded", param="messages")
        if out[-1].role != "user":
            raise APIError(400, "the last message must be the user's", param="messages")
        if (n_images or n_videos) and engine.model.mtmd is None:
            raise APIError(400, "this model was loaded without a projector (--mmproj): it cannot read images",
                           code="images_unsupported", param="messages")
        return out

    async def _next_event(job: Job, request: Request) -> tuple[str, Any]:
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    raise _ClientGone from None

    async def _sse(job: Job, first, cid: str, now: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
        def chunk(delta: dict, finish: str | None = None, logprobs: list | None = None, **extra) -> bytes:
            lp = {"content": logprobs, "refusal": None} if logprobs is not None else None
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while event[0] == "token":
                yield chunk({"content": event[1][0]}, logprobs=event[1][1])
                event = await job.events.get()
            if event[0] == "done":
                res = event[1]
                yield chunk({}, res["finish_reason"], edgekv=res["edgekv"])
                if include_usage:
                    body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model,
                            "choices": [], "usage": res["usage"]}
                    yield b"data: " + json.dumps(body).encode() + b"\n\n"
            else:   # an error after the answer started: the status is sent, so say it in the stream
                err = api_error(event[1]) if event[0] == "error" else APIError(499, "cancelled")
                yield b"data: " + json.dumps(error_body(str(err), err.type, err.code)).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:   # the client went away mid-answer (or the server is stopping)
                engine.cancel(job)

    if webui:
        mount_webui(app, engine)
    return Guard(BodyLimit(app, max_request_bytes, read_timeout=read_timeout), keys, hosts, cors_origins)


def _check_media(i: int, role: str, kind: str, n: int, limit: int, option: str = "") -> None:
    """The n-th image or video of a request, in message i: user messages only, at most `limit`."""
    if role != "user":
        raise APIError(400, f"messages[{i}]: {kind}s are accepted in user messages only", param=f"messages.{i}")
    if n > limit:
        raise APIError(400, f"more than {limit} {kind}s in one request{option}", code=f"too_many_{kind}s",
                       param="messages")


class _ClientGone(Exception):
    pass


def _lone_surrogate(data: Any) -> str | None:
    """The path ("messages.0.content") of the first string holding a lone UTF-16 surrogate (JSON allows
    "\\ud800"; UTF-8 cannot encode it), else None. Iterative: the body may be nested deep."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return where
        elif isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    return where
                stack.append((f"{where}.{k}" if where else k, x))
        elif isinstance(v, list):
            stack.extend((f"{where}.{i}" if where else str(i), x) for i, x in enumerate(v))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _grammar(req: ChatRequest) -> str | None:
    """response_format -> GBNF for llama.cpp's grammar sampler: any JSON object, or the given JSON schema
    (llama-cpp-python's converter), or None for text."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if rf.type == "json_object":
        return JSON_GBNF
    if rf.json_schema is None or not rf.json_schema.schema_:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    try:
        return json_schema_to_gbnf(json.dumps(rf.json_schema.schema_))
    except Exception as e:   # the converter raises whatever it meets (KeyError, ValueError, RecursionError...)
        raise APIError(400, f"response_format: this JSON schema is not supported: {type(e).__name__}: {e}",
                       code="invalid_response_format", param="response_format") from None


def _refuse_tools(req: ChatRequest) -> None:
    """Tool calling is not served: a request that asks for it gets 400 rather than an answer that
    silently ignored its tools."""
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise APIError(400, f"{name} are not supported: edgekv does not call tools (send the request "
                           f"without {name!r})", code="unsupported_parameter", param=name)
    for name in ("tool_choice", "function_call"):
        if getattr(req, name) not in (None, "none"):
            raise APIError(400, f"{name} is not supported: edgekv does not call tools", code="unsupported_parameter",
                           param=name)
