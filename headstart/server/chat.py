"""``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI door.

A request joins a session through the ``x-session-id`` header; without it the request is
a one-off. The answer carries OpenAI's fields plus a ``headstart`` object saying which
path the request took and how long its first token took.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from headstart.engine import Engine
from headstart.handle import Completion, Delta, Handle
from headstart.server.gone import unless_gone
from headstart.server.schema import ChatCompletionRequest

SESSION_HEADER = "x-session-id"


def owner_of(request: Request) -> str | None:
    """The API key that made the request, when keys are in force (set by the auth layer)."""
    return getattr(request.state, "owner", None)


def arrival_of(request: Request) -> float:
    """When the request reached the app (app.StampArrival; now, for an app without it)."""
    return getattr(request.state, "arrival", None) or time.perf_counter()


def extension(c: Completion, replica: str | None) -> dict[str, Any]:
    """The ``headstart`` object: how the request was served, and by which replica (None: a single server)."""
    return {
        "session_id": c.session_id,
        "replica": replica,
        "path": c.path,
        "ttft_ms": round(c.ttft_ms, 3),
        "decided_ms": round(c.decided_ms, 3),
        "e2e_ms": round(c.e2e_ms, 3),
        "foreground_wait_ms": round(c.foreground_wait_ms, 3),
        "door_ms": round(c.door_ms, 3),
        "queue_ms": round(c.queue_ms, 3),
        # A gap over a single fast_answer candidate is infinite; JSON has no infinity.
        "logit_gap": c.logit_gap if c.logit_gap is None or math.isfinite(c.logit_gap) else None,
        "speculative": c.speculative,
        # Whether the gate's first token (or candidate) is the one the full computation gives;
        # None when the gate did not answer (every other path is exact).
        "verified": c.verified,
        "candidate": c.candidate,
    }


def usage(c: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    }


def _finish_reason(c: Completion) -> str:
    return "stop" if c.finish_reason == "cancelled" else c.finish_reason


def message(c: Completion) -> dict[str, Any]:
    """The answer as an OpenAI assistant message: content, and the calls it makes."""
    if not c.tool_calls:
        return {"role": "assistant", "content": c.text}
    return {"role": "assistant", "content": c.text or None, "tool_calls": [call.openai() for call in c.tool_calls]}


def tool_call_deltas(c: Completion) -> list[dict[str, Any]]:
    """Streamed calls: one ``delta.tool_calls`` entry per call, whole (a call is known only
    once the answer is read, so its arguments are not split)."""
    return [{"tool_calls": [{"index": i, **call.openai()}]} for i, call in enumerate(c.tool_calls or ())]


async def create_chat_completion(request: Request) -> Response:
    """Generate a chat answer, streamed as SSE when ``stream`` is true."""
    from headstart.server.errors import read_body

    arrival = arrival_of(request)
    state = request.app.state.headstart
    engine = state.require_engine()
    body = await read_body(request, state.config.max_body_bytes)
    session_id = request.headers.get(SESSION_HEADER) or None
    opened: list[Handle] = []
    try:
        req = await run_in_threadpool(
            _open, engine, body, session_id, owner_of(request), state.config.default_temperature,
            asyncio.get_running_loop(), arrival, opened,
        )
    except asyncio.CancelledError:  # the client left while the request was being opened
        for h in opened:
            h.cancel()
        raise
    handle = opened[0]
    model = engine.backend.info.name
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        stream = _sse(handle, completion_id, created, model, include_usage, state.config.replica)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    completion = await unless_gone(request, collect(handle), handle.cancel)
    body_out = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message(completion),
                "logprobs": None,
                "finish_reason": _finish_reason(completion),
            }
        ],
        "usage": usage(completion),
        "headstart": extension(completion, state.config.replica),
    }
    return JSONResponse(body_out)


def _open(
    engine: Engine,
    body: bytes,
    session_id: str | None,
    owner: str | None,
    default_temperature: float,
    loop: asyncio.AbstractEventLoop,
    arrival: float,
    opened: list[Handle],
) -> ChatCompletionRequest:
    """Parse, validate and submit a chat request, putting its handle in ``opened``: on a
    worker thread, since parsing a long conversation and rendering and tokenising it would
    hold the event loop for milliseconds."""
    from headstart.server.errors import parse_json

    req = ChatCompletionRequest.model_validate(parse_json(body))
    engine_req = req.to_engine(session_id, owner, default_temperature)
    engine_req.arrival = arrival
    opened.append(engine.submit(engine_req, loop=loop))
    return req


async def collect(handle: Handle) -> Completion:
    """The completion at the end of ``handle`` (the deltas before it are dropped)."""
    async for item in handle:
        if isinstance(item, Completion):
            return item
    raise RuntimeError("the engine ended a request without a completion")


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _sse_line(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _sse(
    handle: Handle, completion_id: str, created: int, model: str, include_usage: bool, replica: str | None
) -> AsyncIterator[str]:
    """OpenAI chunks; a client that goes away cancels the generation."""
    try:
        yield _sse_line(_chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None))
        try:
            async for item in handle:
                if isinstance(item, Delta):
                    yield _sse_line(_chunk(completion_id, created, model, {"content": item.text}, None))
                else:
                    for delta in tool_call_deltas(item):
                        yield _sse_line(_chunk(completion_id, created, model, delta, None))
                    last = _chunk(completion_id, created, model, {}, _finish_reason(item))
                    if include_usage:
                        yield _sse_line(last)
                        last = {**_chunk(completion_id, created, model, {}, None), "choices": [],
                                "usage": usage(item)}
                    last["headstart"] = extension(item, replica)
                    yield _sse_line(last)
        except Exception as exc:  # the headers are gone: report in-band, as OpenAI does
            from headstart.server.errors import to_response

            yield f"data: {to_response(exc).body.decode()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


async def list_models(request: Request) -> Response:
    """The one model this server runs."""
    engine = request.app.state.headstart.require_engine()
    info = engine.backend.info
    return JSONResponse(
        {"object": "list", "data": [{"id": info.name, "object": "model", "created": int(engine.started),
                                     "owned_by": "headstart"}]}
    )


def routes(wrap: Callable) -> list[Route]:
    return [
        Route("/v1/chat/completions", wrap(create_chat_completion), methods=["POST"]),
        Route("/v1/models", wrap(list_models), methods=["GET"]),
    ]
