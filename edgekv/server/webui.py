"""The chat page of `edgekv serve`: a static page (webui/: HTML, JS, CSS; no build step, nothing fetched from
elsewhere) served at `/`, plus one small read-only endpoint it needs for its per-turn picture.

The page talks to the server through the same endpoints as any client (/v1/chat/completions, streamed).
The page and its files are open (they hold no data); /v1/edgekv/info sits under /v1/, so `--api-key`
guards it like the rest of the API, and the page shows a wrong key as an error."""
from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import Response

from edgekv.methods import METHODS, uses_queries

if TYPE_CHECKING:
    from edgekv.server.engine import Engine

STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Everything comes from this origin; images are data: URLs the page reads from the user's files.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def asset(name: str) -> bytes:
    """A file of the page, read from the installed package (a wheel ships them as package data)."""
    return resources.files("edgekv.server").joinpath("webui", name).read_bytes()


def info(engine: Engine) -> dict:
    """What the page needs besides the chat endpoint: the model name to send, the methods it may offer
    (query-aware ones only when the server captures queries), the defaults, and the sizes its memory bars
    are drawn against (bytes of one KV cell, the context)."""
    model = engine.model
    captures = model.capture is not None
    return {"model": engine.model_id, "n_ctx": model.n_ctx, "cell_bytes": model.cell_bytes,
            "methods": sorted(m for m in METHODS if captures or not uses_queries(m)),
            "method": engine.default_method, "budget": engine.default_budget, "max_tokens": engine.max_tokens,
            "images": model.mtmd is not None,
            "video": model.mtmd is not None}   # video_url parts: streamed and compacted chunk by chunk


def mount(app: FastAPI, engine: Engine) -> None:
    """Add GET / (the page), /webui/<file> and GET /v1/edgekv/info to `app`."""

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(asset("index.html"), media_type="text/html; charset=utf-8",
                        headers={**HEADERS, "Content-Security-Policy": CSP})

    def static(name: str, media_type: str):
        async def serve_file() -> Response:
            return Response(asset(name), media_type=media_type, headers=HEADERS)
        return serve_file

    for name, media_type in STATIC.items():
        app.add_api_route(f"/webui/{name}", static(name, media_type), methods=["GET"], include_in_schema=False)

    @app.get("/v1/edgekv/info", include_in_schema=False)
    async def webui_info() -> dict:
        return info(engine)
