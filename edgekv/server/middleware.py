"""ASGI middleware, outermost first: `Guard` (Host, Origin, API key and Content-Type, all from the headers,
before any body is read) and `BodyLimit` (the request size and the body's read timeout). Plain ASGI
wrappers, not Starlette's BaseHTTPMiddleware: under that, `request.is_disconnected()` never turns true, so
a client that left could not stop its queued or running turn."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets

from edgekv.server.schemas import error_body


async def send_error(send, status: int, message: str, code: str, type_: str = "invalid_request_error",
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An OpenAI-shaped error answered straight from an ASGI middleware (the connection is closed)."""
    body = json.dumps(error_body(message, type_, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _host_name(value: str) -> str:
    """'Example.com:8080' -> 'example.com', '[::1]:8080' -> '::1' (Host headers and Origin netlocs)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware, outermost; everything here is decided from the headers, before the body is read:

    - Host must name the bound address (or a loopback name when it is loopback, or an --allowed-host):
      a page on another site that rebinds its DNS name to 127.0.0.1 sends its own name (DNS rebinding).
    - a browser's Origin must be this server's own or a --cors-origin (answered with CORS headers):
      any web page could otherwise drive a keyless local server (ollama's CVE-2024-28224).
    - POSTs to /v1/ must say Content-Type: application/json (a form or text/plain POST is what a page can
      send cross-site without a preflight).
    - the API key (Authorization: Bearer), compared in constant time against every key.

    A plain ASGI wrapper, not Starlette's BaseHTTPMiddleware: under that, `request.is_disconnected()`
    never turns true, so a client that left could not stop its queued or running turn."""

    def __init__(self, app, api_keys: tuple[str, ...] = (), hosts: tuple[str, ...] | None = None,
                 cors_origins: tuple[str, ...] = ()) -> None:
        self.app, self.api_keys = app, tuple(k.encode() for k in api_keys)
        self.hosts = None if hosts is None or "*" in hosts else {_host_name(h) for h in hosts}
        self.cors = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.host_ok(_host_name(host)):
            return await send_error(send, 403, f"Host {host!r} is not this server's (--allowed-host adds names)",
                                    "host_not_allowed")
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/").lower()
        cors: tuple[tuple[bytes, bytes], ...] = ()
        if origin:
            same = origin.split("://", 1)[-1] == host.strip().lower()
            if not same and origin not in self.cors and "*" not in self.cors:
                return await send_error(send, 403, f"Origin {origin!r} may not use this server (--cors-origin "
                                        "allows one)", "origin_not_allowed")
            if not same:
                cors = ((b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"))
                if scope["method"] == "OPTIONS":   # the preflight of a cross-origin POST
                    return await self._preflight(send, cors)
        v1 = scope["path"].startswith("/v1/")
        if v1 and self.api_keys:
            key = self.client_key(headers)
            if key is None:
                return await send_error(send, 401, "invalid API key (send Authorization: Bearer KEY)",
                                        "invalid_api_key", headers=cors)
            scope.setdefault("state", {})["api_key"] = key.decode()
        if v1 and scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if ctype != b"application/json":
                return await send_error(send, 415, "send the body as JSON (Content-Type: application/json)",
                                        "unsupported_media_type", headers=cors)
        if not cors:
            return await self.app(scope, receive, send)

        async def send_cors(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *cors]}
            await send(msg)

        return await self.app(scope, receive, send_cors)

    def host_ok(self, name: str) -> bool:
        """Bound to every address (0.0.0.0, ::): any IP literal too (DNS rebinding needs a name)."""
        if self.hosts is None or name in self.hosts:
            return True
        if self.hosts & {"0.0.0.0", "::"}:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    async def _preflight(self, send, cors) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [
            *cors, (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", b"authorization, content-type"), (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})

    def client_key(self, headers: dict[bytes, bytes]) -> bytes | None:
        """The request's key if it is one of the server's (compared in constant time), else None."""
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        ok = None
        for k in self.api_keys:   # every key compared: the time does not say which matched
            if secrets.compare_digest(given, k):
                ok = k
        return ok


class BodyLimit:
    """ASGI middleware: a body over max_bytes gets 413 before it is read whole (Content-Length checked
    first; a chunked body is counted as it arrives). The rest of an oversized body is drained, not kept,
    so the client can read the answer instead of a reset connection."""

    def __init__(self, app, max_bytes: int, drain_bytes: int = 256 << 20, read_timeout: float = 30.0) -> None:
        self.app, self.max_bytes, self.drain_bytes, self.read_timeout = app, max_bytes, drain_bytes, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(receive, send, 0)
        chunks, total = [], 0
        deadline = asyncio.get_running_loop().time() + self.read_timeout
        while True:
            try:   # a stalled upload holds memory and a connection: the whole body within --read-timeout
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                return await send_error(send, 408, f"the request body did not arrive within {self.read_timeout:g} s "
                                        "(--read-timeout)", "request_timeout")
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._reject(receive, send, total, more=msg.get("more_body", False))
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_again, send)

    async def _reject(self, receive, send, seen: int, more: bool = True) -> None:
        mb = self.max_bytes / (1 << 20)
        await send_error(send, 413, f"request body larger than {mb:g} MiB (--max-request-mb)", "request_too_large")
        while more and seen < self.drain_bytes:   # discard what the client is still sending
            msg = await receive()
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            more = msg.get("more_body", False)
