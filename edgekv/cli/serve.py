"""`edgekv serve`: the OpenAI-compatible server (FastAPI + uvicorn), one model, conversations kept compacted."""
from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

import click

from edgekv.cli.options import (apply_kv_memory, kv_memory_option, load_model_from_options, method_options,
                                model_options, recall_options, resolve_model_paths)
from edgekv.errors import EdgeKVError


def _check_port(host: str, port: int) -> None:
    """Fail with one line before the model loads, not with uvicorn's log after it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise EdgeKVError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise EdgeKVError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@model_options
@method_options
@recall_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the model to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--alias", "aliases", multiple=True, help="Extra model name clients may ask for (repeatable).")
@click.option("--api-key", "api_keys", envvar="EDGEKV_API_KEY", multiple=True,
              help="Require `Authorization: Bearer KEY` on /v1/ (repeatable: one per user, each with its own "
                   "kept conversations; env EDGEKV_API_KEY, space-separated).")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Another name clients may use in the Host header (repeatable; '*' turns the check off). "
                   "The bound address, and localhost names when it is loopback, are always accepted.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="A web origin (https://app.example) whose pages may call the server (repeatable; '*' any). "
                   "Other origins get 403.")
@click.option("--read-timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds a request body may take to arrive (slower ones get 408).")
@click.option("--idle-timeout", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--max-request-mb", type=click.FloatRange(0.001), default=32.0, show_default=True,
              help="Larger request bodies get 413 before they are read.")
@click.option("--max-image-pixels", type=click.IntRange(1), default=50_000_000, show_default=True,
              help="Images with more pixels are refused (400): decompression bombs.")
@click.option("--max-request-pixels", type=click.IntRange(1), default=100_000_000, show_default=True,
              help="All images of one request together; more get 400.")
@click.option("--max-images", type=click.IntRange(1), default=16, show_default=True,
              help="Images in one request; more get 400.")
@click.option("--allow-local-files", "local_dirs", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Accept image_url file paths under this folder (repeatable); off by default.")
@click.option("--cache-ram", "cache_mib", type=click.FloatRange(0), default=1024.0, show_default=True,
              help="MiB of host RAM for kept conversations (compacted caches; LRU).")
@click.option("--recall-disk-mb", "recall_disk_mib", type=click.FloatRange(0), default=4096.0, show_default=True,
              help="MiB of disk for kept conversations' --recall disk stores (LRU, with --cache-ram).")
@click.option("--queue-size", type=click.IntRange(1), default=8, show_default=True,
              help="Requests that may wait while one is served; more get 503.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=1024, show_default=True,
              help="Answer length when a request does not say.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Sampling seed when a request sets none.")
@click.option("--no-webui", is_flag=True, help="Do not serve the chat page at / (the API only).")
@kv_memory_option
def serve(model, mmproj, hf_repo, offline, model_opts, method, budget, compress, swa_budget, recall, recall_dir, recall_type,
          recall_min_share,
          host, port, aliases, api_keys,
          allowed_hosts, cors_origins, read_timeout, idle_timeout, max_request_mb, max_image_pixels, max_request_pixels,
          max_images, local_dirs, cache_mib, recall_disk_mib, queue_size, max_tokens, seed, no_webui, kv_memory):
    """OpenAI-compatible server: /v1/chat/completions, /v1/models, /health, and a chat page at /."""
    try:
        import fastapi  # noqa: F401  (only checks that the extra is installed)
        import uvicorn
    except ImportError:
        raise EdgeKVError("edgekv serve needs FastAPI and uvicorn: pip install 'edgekv[serve]'") from None
    from edgekv.methods import uses_queries
    from edgekv.server.app import create_app
    from edgekv.server.engine import Engine
    from edgekv.server.images import ImageLoader

    if any(not k.strip() for k in api_keys):
        raise EdgeKVError("--api-key is empty: that would look like authentication and be none; give a key, "
                          "or leave the option out")
    api_keys = tuple(k.strip() for k in api_keys)
    _check_port(host, port)
    if not _is_loopback(host) and not api_keys:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)
    # Query capture is on unless the default method is query-agnostic (then a request asking for a
    # query-aware method gets 400: capture cannot be switched on without reloading).
    if kv_memory is not None:
        # cache types and budget from one knob; the server compacts a turn after its prefill, so the context
        # keeps its -c cells (at the picked cache type: that is what shrinks the allocation)
        model, mmproj = resolve_model_paths(model, mmproj, hf_repo, offline)
        model_opts, budget, _, picked, swa_budget = apply_kv_memory(kv_memory, model_opts, budget, (model, mmproj),
                                                                    swa_budget)
        click.echo(f"edgekv: {picked}; context {model_opts.n_ctx} cells (-c)", err=True)
    m = load_model_from_options(model, mmproj, None if kv_memory is not None else hf_repo, offline, model_opts,
                                capture_queries=uses_queries(method))
    model_id = hf_repo or m.path.stem
    engine = Engine(m, model_id=model_id, method=method, budget=budget, compress=compress, seed=seed,
                    queue_size=queue_size, cache_bytes=int(cache_mib * (1 << 20)),
                    max_image_pixels=max_image_pixels, max_tokens=max_tokens, recall=recall,
                    recall_dir=recall_dir, recall_type=recall_type, recall_min_share=recall_min_share,
                    swa_budget=swa_budget,
                    recall_disk_bytes=int(recall_disk_mib * (1 << 20)))
    hosts = None if "*" in allowed_hosts else (
        host, *allowed_hosts, *(("localhost", "127.0.0.1", "::1") if _is_loopback(host) or host in ("0.0.0.0", "::")
                                 else ()))
    app = create_app(engine, api_key=api_keys, max_request_bytes=int(max_request_mb * (1 << 20)),
                     images=ImageLoader(local_dirs, max_image_pixels, int(max_request_mb * (1 << 20))),
                     aliases=tuple(aliases), hosts=hosts, cors_origins=tuple(cors_origins),
                     read_timeout=read_timeout, max_images=max_images, max_request_pixels=max_request_pixels,
                     webui=not no_webui)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    click.echo(f"edgekv serve: {model_id} on http://{host}:{port}/v1 (method {method}, budget {budget}, "
               f"conversation cache {cache_mib:g} MiB, recall {recall})", err=True)
    if not no_webui:
        click.echo(f"chat page: http://{host}:{port}/", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                    timeout_keep_alive=idle_timeout)
    finally:
        if not engine.close(timeout=5):   # the model is freed only once the worker is out of llama.cpp
            click.echo("edgekv serve: waiting for the running request to stop (an image encode cannot be "
                       "interrupted)", err=True)
            engine.close()
        m.close()
