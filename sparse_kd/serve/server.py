"""The HTTP ranking service: :class:`~sparse_kd.serve.service.Service` behind Starlette on uvicorn.

``sparse-kd serve ARTIFACT --port P`` runs :func:`run_server`; tests and benchmarks use
:func:`running_server` (a server on a free port of 127.0.0.1, in a thread). Endpoints (bodies
and errors: :mod:`sparse_kd.serve.service` and docs/SERVING.md):

=====================  ===================================================================
``POST /rank``         one user, candidate items -> scores (request order), ``order`` (best
                       first), unknown-id flags
``POST /score``        pairs -> scores, unknown-id flags
``GET /health``        the artifact served (id, path, tables, fallback), limits, reloads
``GET /metrics``       Prometheus text: requests by route and status, latency histograms,
                       scored pairs, unknown ids, reloads, queue
``POST /admin/reload`` load ``{"path": ...}`` (default: the served folder) and swap it in;
                       422 and the old artifact keeps serving when it is corrupt
=====================  ===================================================================

Starlette rather than FastAPI: the endpoints parse their JSON themselves (to answer every bad
body with a 4xx that names the key), so FastAPI's validation layer would only add per-request
cost (measured by ``benchmarks/bench_serve.py``, section ``framework_overhead``). Every error,
404 and 405 included, is a JSON body ``{"error": message}``. Scoring runs on the service's
scoring threads; parsing, limits and metrics on the event loop. No transformers, torchrec or
training code is imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import socket
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from sparse_kd.serve.requests import RequestError, parse_json, parse_rank, parse_reload, parse_score
from sparse_kd.serve.service import Service

log = logging.getLogger(__name__)

ROUTES = ("/rank", "/score", "/health", "/metrics", "/admin/reload")
JSON = "application/json"


def _error(status: int, message: str, headers: Optional[dict] = None) -> Response:
    import json

    return Response(json.dumps({"error": message}), status_code=status, media_type=JSON, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes (413 before reading when Content-Length says more)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _endpoint(fn: Callable[[Service, Request], Awaitable[Response]], service: Service):
    """Every failure becomes a JSON error: RequestError -> its status, anything else -> 500 (logged)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(service, request)
        except RequestError as e:
            return _error(e.status, e.message, {"Retry-After": "1"} if e.status == 503 else None)
        except ClientDisconnect:
            return _error(400, "the client disconnected before sending the whole body")
        except Exception as e:
            log.exception("%s %s failed", request.method, request.url.path)
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    return endpoint


async def _rank(service: Service, request: Request) -> Response:
    req = parse_rank(parse_json(await read_body(request, service.limits.max_body_bytes)), service.limits)
    return Response(await service.rank(req), media_type=JSON)


async def _score(service: Service, request: Request) -> Response:
    users, items = parse_score(parse_json(await read_body(request, service.limits.max_body_bytes)), service.limits)
    return Response(await service.score(users, items), media_type=JSON)


async def _health(service: Service, request: Request) -> Response:
    import json

    return Response(json.dumps(service.health()), media_type=JSON)


async def _metrics(service: Service, request: Request) -> Response:
    return Response(service.metrics.render(service.current, service.pending),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def _reload(service: Service, request: Request) -> Response:
    import json

    service.check_admin(request.headers.get("x-admin-token"))
    body = await read_body(request, service.limits.max_body_bytes)
    path = parse_reload(parse_json(body)) if body.strip() else None
    return Response(json.dumps(await service.reload(path)), media_type=JSON)


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request by route and status and times it (paths that are
    no route are counted as ``other``, so random paths cannot blow up the label set)."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight -= 1
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.observe(route, status[0], time.perf_counter() - t0)


def create_app(service: Service) -> Any:
    """The ASGI application of ``service`` (its lifespan starts and stops the manifest watcher)."""

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        msg = {404: f"no such endpoint {request.url.path}; endpoints: {', '.join(ROUTES)}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, msg, getattr(exc, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import asyncio

        task = asyncio.create_task(service.watch()) if service.watch_interval > 0 else None
        if task is not None:
            log.info("watching %s/manifest.json every %.1fs", service.current.path, service.watch_interval)
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    routes = [
        Route("/rank", _endpoint(_rank, service), methods=["POST"]),
        Route("/score", _endpoint(_score, service), methods=["POST"]),
        Route("/health", _endpoint(_health, service), methods=["GET"]),
        Route("/metrics", _endpoint(_metrics, service), methods=["GET"]),
        Route("/admin/reload", _endpoint(_reload, service), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    return MetricsMiddleware(app, service)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one (read it with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (proto 0 does
    # not), and without it the response headers and body, written separately, meet Nagle + delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0 = any free port)") from None
    sock.listen(2048)
    return sock


def implementations() -> tuple[str, str]:
    """uvicorn's (HTTP parser, event loop): httptools and uvloop (both C, pinned in
    requirements.lock; uvicorn's "standard" setup) when installed, else the pure-Python h11 and
    asyncio. ``benchmarks/bench_serve.py --http h11 --loop asyncio`` compares the two; on 1 x 500
    ranks they measured within a few percent of each other (docs/BENCHMARKS.md section 6)."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http, loop


def _config(service: Service, access_log: bool = False, timeout_keep_alive: int = 5,
            impl: Optional[tuple[str, str]] = None) -> uvicorn.Config:
    http, loop = impl or implementations()
    return uvicorn.Config(create_app(service), log_config=None, access_log=access_log, lifespan="on", http=http,
                          loop=loop, timeout_keep_alive=timeout_keep_alive, server_header=False,
                          timeout_graceful_shutdown=30)


class _Stop(Exception):
    """SIGTERM, re-raised by uvicorn once it has drained the requests in flight."""


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def run_server(service: Service, host: str = "127.0.0.1", port: int = 8000, access_log: bool = False,
               impl: Optional[tuple[str, str]] = None) -> None:
    """Serve until SIGINT / SIGTERM (in-flight requests finish first, then it returns); logs the
    address it listens on. impl: uvicorn's (http, loop), default :func:`implementations`."""
    import signal

    sock = bind(host, port)
    h, p = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (POST /rank, POST /score, GET /health, GET /metrics, POST /admin/reload)",
             f"[{h}]" if ":" in h else h, p)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stop) if main_thread else None
    try:
        uvicorn.Server(_config(service, access_log, impl=impl)).run(sockets=[sock])
    except (KeyboardInterrupt, _Stop):
        pass  # uvicorn re-raises the signal that stopped it, after its graceful shutdown
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        service.close()
        sock.close()
        log.info("stopped")


@contextlib.contextmanager
def running_server(service: Service, host: str = "127.0.0.1", start_timeout: float = 60.0,
                   impl: Optional[tuple[str, str]] = None) -> Iterator[str]:
    """Run ``service`` on a free port in a thread; yields its base URL, stops it on exit.
    impl: uvicorn's (http, loop), default :func:`implementations`."""
    sock = bind(host, 0)
    server = uvicorn.Server(_config(service, impl=impl))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="sparse_kd-server", daemon=True)
    t.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server thread did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(timeout=60)
        service.close()
        sock.close()
