"""The ASGI app: the model loads in the background while /health says 503.

Routes live in small modules (chat, ...); this one builds the app, owns the engine's
life and turns every exception into an OpenAI-shaped error.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from headstart.config import HEARTBEAT_S, MAX_BODY_BYTES, MAX_EVENT_STREAMS, TEMPERATURE
from headstart.engine.engine import Engine, EngineConfig
from headstart.server.errors import HTTPError, error_response, to_response

log = logging.getLogger("headstart.server")

# How long a thread waiting for the interpreter lock lets the holder run before it asks for
# the lock (CPython's default: 5 ms). The event loop hands every request to a worker thread
# and every token from the model thread to a client; the model thread, busy with the next
# token, holds the lock between its tensor operations, so each hand-off waited up to the
# full interval. A short one bounds that wait; switches happen only while threads contend.
SWITCH_INTERVAL_S = 0.0005
# Requests opened at once (parsed, rendered, submitted); one compiling a new output schema
# can take seconds, so a few run side by side.
DOOR_THREADS = 8


@dataclass
class ServerConfig:
    """What ``headstart serve`` was told."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    default_temperature: float = TEMPERATURE
    max_body_bytes: int = MAX_BODY_BYTES
    api_keys: frozenset[str] = frozenset()
    db: str | None = None  # SQLite file or postgresql:// URL; None: SQLite in the data folder; "" keeps nothing
    spill_dir: str | None = None  # None: in the data folder
    heartbeat_seconds: float = HEARTBEAT_S  # between SSE heartbeats on a quiet event stream
    # Open ``/events`` streams at once; one more is refused with 429. Each holds a slot of a
    # replica's ``max_ongoing_requests`` for its whole life, so replicas keep this below
    # their slots and the rest serve turns (config.py).
    max_event_streams: int = MAX_EVENT_STREAMS
    served_model_names: tuple[str, ...] = ()  # names the OpenAI door answers to; () for the model's own
    # This server's name among replicas (headstart/scaleout): it fences the server's writes
    # to the shared store and is named in every answer. None: a single server.
    replica: str | None = None


class State:
    """The app's engine, or why there is none yet."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.event_streams = 0  # open /events streams (read and written on the event loop only)
        # Where a request is parsed, rendered and submitted, off the event loop (chat.open_request).
        self.door = ThreadPoolExecutor(DOOR_THREADS, thread_name_prefix="headstart-door")

    def require_engine(self) -> Engine:
        if self.engine is None:
            message = f"the model failed to load: {self.error}" if self.error else "the model is loading"
            raise HTTPError(503, message, "service_unavailable", code="model_loading")
        return self.engine


def _load(state: State, factory: Callable[[], Engine]) -> None:
    try:
        state.engine = factory().start()
    except Exception as exc:  # reported through /health, not a crash
        log.exception("model load failed")
        state.error = f"{type(exc).__name__}: {exc}"
    finally:
        state.ready.set()


def default_factory(config: ServerConfig) -> Callable[[], Engine]:
    """The engine builder of ``headstart serve``. The database and the spill folder are
    claimed here, before the model loads, so a second server on the same data stops at
    once (:class:`~headstart.session.ownership.Claimed`, naming the holder) instead of serving."""
    from headstart.session.open_store import open_store
    from headstart.session.ownership import Claim
    from headstart.session.store import default_data_dir

    data = default_data_dir()
    db = config.db if config.db is not None else str(data / "headstart.db")
    spill_dir = config.spill_dir if config.spill_dir is not None else str(data / "spill")
    # What this server holds for as long as it lives: its database and its spill folder.
    store = open_store(db, holder=config.replica) if db else None
    held = (store, Claim(Path(spill_dir) / "owner.lock", f"the spill folder {spill_dir}"))

    def build() -> Engine:
        from headstart.model import load

        store, _spill = held
        backend = load(config.model, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir)
        return Engine(backend, config=config.engine, store=store, spill_dir=spill_dir)

    return build


async def health(request: Request) -> Response:
    state: State = request.app.state.headstart
    if state.engine is not None:
        info = state.engine.backend.info
        return JSONResponse({"status": "ok", "model": info.name, "device": info.device})
    status = "error" if state.error else "loading"
    return JSONResponse({"status": status, "error": state.error}, status_code=503)


class StampArrival:
    """Notes when a request reached the app, before anything reads it: the engine's
    times (ttft_ms, decided_ms, e2e_ms) count from here."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrival"] = time.perf_counter()
        await self.app(scope, receive, send)


def wrap(handler: Callable) -> Callable:
    """Answer every exception a route raises in the OpenAI error shape."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            return to_response(exc)

    route.__name__ = handler.__name__
    route.__doc__ = handler.__doc__
    return route


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods, in the OpenAI error shape too."""
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", kind)


async def _server_error(request: Request, exc: Exception) -> Response:
    return to_response(exc)


def create_app(config: ServerConfig | None = None, factory: Callable[[], Engine] | None = None) -> Starlette:
    """The app; ``factory`` builds the engine (tests pass a prepared one)."""
    from headstart.server import chat, completions, sessions
    from headstart.server.auth import APIKeyAuth
    from headstart.server.metrics import Metrics, metrics
    from headstart.server.openapi import openapi

    config = config or ServerConfig()
    state = State(config)
    observed = Metrics(lambda: state.engine)
    build = factory or default_factory(config)

    def build_observed() -> Engine:
        engine = build()
        observed.attach(engine)
        return engine

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = threading.Thread(target=_load, args=(state, build_observed), name="headstart-load", daemon=True)
        loader.start()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL_S))
        try:
            yield
        finally:
            sys.setswitchinterval(interval)
            state.door.shutdown(wait=False, cancel_futures=True)
            if state.engine is not None:
                state.engine.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", wrap(metrics), methods=["GET"]),
        Route("/openapi.json", wrap(openapi), methods=["GET"]),
        *chat.routes(wrap),
        *completions.routes(wrap),
        *sessions.routes(wrap),
    ]
    middleware = [Middleware(StampArrival)]  # outermost: before auth reads a header
    if config.api_keys:
        middleware.append(Middleware(APIKeyAuth, keys=config.api_keys))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.headstart = state
    app.state.metrics = observed
    return app
