"""The sessions API: sessions, warm turns, streaming data, questions, registered questions, events.

Each route reads and validates its body, calls the engine-side operation in
headstart/engine/sessions.py, and answers through a response model. A session belongs to the
API key that created it (``request.state.owner``, set by auth.py): any other key gets 404.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from headstart.engine import sessions as sessionapi
from headstart.engine.engine import Engine
from headstart.errors import BadRequest
from headstart.idle import job as upkeep
from headstart.idle import queries
from headstart.idle.ingest import PushResult
from headstart.server.chat import SESSION_HEADER, arrival_of, collect, owner_of
from headstart.server.errors import parse_json, read_body, read_json
from headstart.server.gone import unless_gone
from headstart.server.schemas import (
    ChatCompletionRequest,
    CreateSessionRequest,
    Deleted,
    GenerateRequest,
    GenerateResponse,
    PushRequest,
    PushResponse,
    QueryList,
    QueryObject,
    QueryRequest,
    SessionList,
    SessionObject,
    WarmResponse,
)
from headstart.session.session import Session


def respond(model: type[BaseModel], data: dict[str, Any], status: int = 200) -> Response:
    """Serialise through ``model`` (non-finite floats become null, as JSON needs)."""
    return Response(model.model_validate(data).model_dump_json(), status_code=status, media_type="application/json")


def _engine(request: Request) -> Engine:
    return request.app.state.headstart.require_engine()


async def _body(request: Request) -> object:
    return await read_json(request, request.app.state.headstart.config.max_body_bytes)


def _session(request: Request, engine: Engine) -> Session:
    return engine.get_session(request.path_params["session_id"], owner_of(request))


async def create_session(request: Request) -> Response:
    """Create a session; a ``system`` prompt is prefilled in the background."""
    engine = _engine(request)
    req = CreateSessionRequest.model_validate(await _body(request))
    # The id may come in the header too, as on every other request, so that a router that
    # reads only headers (replicas behind Ray Serve) creates the session where it will live.
    header = request.headers.get(SESSION_HEADER)
    if header and req.id and header != req.id:
        raise BadRequest(f"{SESSION_HEADER} {header!r} and id {req.id!r} name different sessions", param="id")
    s = sessionapi.open_session(
        engine, req.id or header, owner_of(request), system=req.system, pre_position=req.pre_position,
        window=req.window, gate=req.gate, gap_threshold=req.gap_threshold,
    )
    return respond(SessionObject, sessionapi.describe(engine, s))


async def list_sessions(request: Request) -> Response:
    """The caller's sessions."""
    engine = _engine(request)
    sessions = engine.list_sessions(owner_of(request))
    return respond(SessionList, {"data": [sessionapi.describe(engine, s) for s in sessions]})


async def get_session(request: Request) -> Response:
    engine = _engine(request)
    return respond(SessionObject, sessionapi.describe(engine, _session(request, engine)))


async def delete_session(request: Request) -> Response:
    """Forget a session and its KV; its event streams end with ``closed``."""
    engine = _engine(request)
    s = _session(request, engine)
    await run_in_threadpool(engine.delete_session, s.id, owner_of(request))  # waits for the commit
    return respond(Deleted, {"id": s.id, "object": "session.deleted"})


async def warm(request: Request) -> Response:
    """Prefill the chat request the next turn would send, generating nothing."""
    engine = _engine(request)
    s = _session(request, engine)
    body = await read_body(request, request.app.state.headstart.config.max_body_bytes)
    temperature = request.app.state.headstart.config.default_temperature

    def queue_warm() -> upkeep.WarmTicket:  # parses, renders and tokenises: off the event loop
        req = ChatCompletionRequest.model_validate(parse_json(body))
        return sessionapi.warm(engine, s, req.to_engine(s.id, owner_of(request), temperature))

    ticket = await run_in_threadpool(queue_warm)
    result = await unless_gone(
        request, asyncio.wrap_future(ticket.future), lambda: upkeep.cancel_warm(engine.idle, s, ticket)
    )
    return respond(WarmResponse, {**result, "session_id": s.id})


async def push(request: Request) -> Response:
    """Queue data entries; they are ingested in the background, in order."""
    engine = _engine(request)
    s = _session(request, engine)
    req = PushRequest.model_validate(await _body(request))

    def measure_and_push() -> PushResult:  # tokenises, then waits for the commit
        return sessionapi.push(engine, s, sessionapi.measure(engine, s, req.entries))

    result = await run_in_threadpool(measure_and_push)
    return respond(
        PushResponse,
        {"session_id": s.id, "pushed": result.pushed, "dropped": result.dropped, "pending": result.pending,
         "data_version": result.data_version, "max_pending": s.data.max_pending},
    )


async def generate(request: Request) -> Response:
    """Ask a prompt against the session's current context without changing it."""
    arrival = arrival_of(request)
    state = request.app.state.headstart
    engine = _engine(request)
    s = _session(request, engine)
    req = GenerateRequest.model_validate(await _body(request))
    loop = asyncio.get_running_loop()
    handle, version = await run_in_threadpool(  # renders and tokenises: off the event loop
        lambda: sessionapi.ask(
            engine, s, req.prompt, req.sampling(state.config.default_temperature), owner=owner_of(request),
            fast_answer=req.fast_answer, gap_threshold=req.gap_threshold, gate=req.gate, loop=loop, arrival=arrival,
        )
    )
    c = await unless_gone(request, collect(handle), handle.cancel)
    return respond(
        GenerateResponse,
        {
            "id": f"gen-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": engine.backend.info.name,
            "session_id": s.id,
            "text": c.text,
            "finish_reason": "stop" if c.finish_reason == "cancelled" else c.finish_reason,
            "path": c.path,
            "logit_gap": c.logit_gap,
            "speculative": c.speculative,
            "verified": c.verified,
            "candidate": c.candidate,
            "data_version": version,
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                      "total_tokens": c.prompt_tokens + c.completion_tokens, "cached_tokens": c.cached_tokens},
            "timing": {"ttft_ms": c.ttft_ms, "decided_ms": c.decided_ms, "e2e_ms": c.e2e_ms,
                       "foreground_wait_ms": c.foreground_wait_ms, "door_ms": c.door_ms, "queue_ms": c.queue_ms,
                       "forwards_before_first_token": c.extra.get("forwards_before_first_token")},
        },
    )


async def create_query(request: Request) -> Response:
    """Register a question, answered in the background now and after every ingested batch."""
    engine = _engine(request)
    s = _session(request, engine)
    req = QueryRequest.model_validate(await _body(request))
    q = await run_in_threadpool(
        sessionapi.add_query, engine, s, req.question, query_id=req.id, max_tokens=req.max_tokens,
        fast_answer=req.fast_answer,
    )
    return respond(QueryObject, q.describe(s))


async def list_queries(request: Request) -> Response:
    engine = _engine(request)
    s = _session(request, engine)
    with s.data.lock:
        items = list(s.queries.values())
    return respond(QueryList, {"data": [q.describe(s) for q in items]})


async def get_query(request: Request) -> Response:
    engine = _engine(request)
    s = _session(request, engine)
    return respond(QueryObject, queries.get(s, request.path_params["query_id"]).describe(s))


async def delete_query(request: Request) -> Response:
    engine = _engine(request)
    s = _session(request, engine)
    query_id = request.path_params["query_id"]
    await run_in_threadpool(sessionapi.remove_query, engine, s, query_id)  # waits for the commit
    return respond(Deleted, {"id": query_id, "object": "session.query.deleted"})


def _json_safe(value: Any) -> Any:
    """Non-finite numbers as null (a gap over a single candidate is infinite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _sse(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    payload = json.dumps(_json_safe(data), separators=(",", ":"), default=str, allow_nan=False)
    return f"{head}event: {name}\ndata: {payload}\n\n"


async def events(request: Request) -> Response:
    """Server-Sent Events: ``data_updated``, ``query_answered``, heartbeats; ``closed`` when the
    session is deleted. The stream ends when the client goes."""
    engine = _engine(request)
    s = _session(request, engine)
    heartbeat = request.app.state.headstart.config.heartbeat_seconds
    listener = s.events.subscribe(asyncio.get_running_loop())

    async def stream() -> AsyncIterator[str]:
        try:
            yield _sse("subscribed", {"session_id": s.id, **s.data.counters()})
            while not s.events.closed:
                event = await listener.get(heartbeat)
                if event is None:
                    yield _sse("heartbeat", {"time": time.time()})
                    continue
                if event.name == "closed":
                    break
                yield _sse(event.name, event.data, event.id)
            yield _sse("closed", {"session_id": s.id})
        finally:
            s.events.unsubscribe(listener)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
    )


@dataclass(frozen=True)
class Endpoint:
    """One operation: its route, and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Callable
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    stream: bool = False


SESSION = "/v1/sessions/{session_id}"
ENDPOINTS = [
    Endpoint("POST", "/v1/sessions", create_session, "Create a session", CreateSessionRequest, SessionObject),
    Endpoint("GET", "/v1/sessions", list_sessions, "List your sessions", None, SessionList),
    Endpoint("GET", SESSION, get_session, "Get a session", None, SessionObject),
    Endpoint("DELETE", SESSION, delete_session, "Delete a session", None, Deleted),
    Endpoint("POST", f"{SESSION}/warm", warm, "Prefill the next turn's request without generating",
             ChatCompletionRequest, WarmResponse),
    Endpoint("POST", f"{SESSION}/push", push, "Push data entries (ingested in the background)", PushRequest,
             PushResponse),
    Endpoint("POST", f"{SESSION}/generate", generate, "Ask a prompt against the session's context (ephemeral)",
             GenerateRequest, GenerateResponse),
    Endpoint("POST", f"{SESSION}/queries", create_query, "Register a question", QueryRequest, QueryObject),
    Endpoint("GET", f"{SESSION}/queries", list_queries, "List registered questions", None, QueryList),
    Endpoint("GET", f"{SESSION}/queries/{{query_id}}", get_query, "Get a registered question", None, QueryObject),
    Endpoint("DELETE", f"{SESSION}/queries/{{query_id}}", delete_query, "Delete a registered question", None,
             Deleted),
    Endpoint("GET", f"{SESSION}/events", events, "Server-Sent Events of the session", None, None, stream=True),
]


def routes(wrap: Callable) -> list[Route]:
    """One route per operation (Starlette tries the next route with the same path when the
    method differs, and answers 405 only when none takes it)."""
    return [Route(e.path, wrap(e.handler), methods=[e.method]) for e in ENDPOINTS]
