"""A Hugging Face Hub faked at the HTTP level: the two endpoints `edgekv -hf` uses, served from local files.

    GET       /api/models/{repo}/tree/{rev}         the repo listing (HfApi.list_repo_files)
    HEAD, GET /{repo}/resolve/{rev}/{filename}      file metadata and bytes (hf_hub_download)

Point huggingface-hub at it with HF_ENDPOINT (read when huggingface_hub is imported, so in a fresh
process). Unknown repos and files answer 404 with the Hub's X-Error-Code, as the real Hub does.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self) -> list[str]:
        """File names whose bytes were fetched (GET on /resolve/)."""
        return [p.rsplit("/", 1)[-1] for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path))
        if path.startswith("/api/models/") and "/tree/" in path:
            repo = path[len("/api/models/"):].split("/tree/")[0]
            if repo not in self.repos:
                return self._error(h, "RepoNotFound", "Repository not found", body)
            listing = [{"type": "file", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": src.stat().st_size,
                        "path": name} for name, src in self.repos[repo].items()]
            return self._send(h, 200, json.dumps(listing).encode(), "application/json", {}, body)
        if "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            name = rest.partition("/")[2]
            if repo not in self.repos:
                return self._error(h, "RepoNotFound", "Repository not found", body)
            if name not in self.repos[repo]:
                return self._error(h, "EntryNotFound", "Entry not found", body)
            data = self.repos[repo][name].read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(h, 200, data, "application/octet-stream", headers, body)
        return self._error(h, "NotFound", "Not found", body)

    def _error(self, h: BaseHTTPRequestHandler, code: str, message: str, body: bool) -> None:
        self._send(h, 404, json.dumps({"error": message}).encode(), "application/json",
                   {"X-Error-Code": code, "X-Error-Message": message}, body)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str, headers: dict[str, str],
              body: bool) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)
