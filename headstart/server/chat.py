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

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from headstart.decode.logits import TokenLogprob
from headstart.engine.engine import Engine
from headstart.engine.output import Completion, Delta, Handle
from headstart.server.gone import unless_gone
from headstart.server.schemas import ChatCompletionRequest

SESSION_HEADER = "x-session-id"


def owner_of(request: Request) -> str | None:
    """The API key that made the request, when keys are in force (set by the auth layer)."""
    return getattr(request.state, "owner", None)


def arrival_of(request: Request) -> float:
    """When the request reached the app (app.StampArrival; now, for an app without it)."""
    return getattr(request.state, "arrival", None) or time.perf_counter()


def served_names(request: Request) -> tuple[str, ...]:
    """The names this server answers to: ``--served-model-name``, else the model's own."""
    state = request.app.state.headstart
    return state.config.served_model_names or (state.require_engine().backend.info.name,)


def model_name(names: tuple[str, ...], requested: str | None) -> str:
    """The name a request asked for among the served ``names`` (the first when it named
    none); an unknown one is a 404 in OpenAI's shape, as vLLM answers it."""
    from headstart.server.errors import HTTPError

    if requested is None:
        return names[0]
    if requested not in names:
        raise HTTPError(404, f"The model `{requested}` does not exist (this server serves {', '.join(names)}).",
                        "invalid_request_error", param="model", code="model_not_found")
    return requested


def extension(c: Completion, replica: str | None, ignored: list[str] | None = None,
              first_chunk_at: float | None = None, arrival: float | None = None) -> dict[str, Any]:
    """The ``headstart`` object: how the request was served, by which replica (None: a single
    server), and what it did not honour. A streamed answer also says when its first chunk
    with answer text left the door (``first_chunk_at``, counted from ``arrival``): the engine's
    ``ttft_ms`` ends where the model chose the token, before the hand-off to the event loop."""
    sent = None if first_chunk_at is None or arrival is None else round((first_chunk_at - arrival) * 1000, 3)
    return {
        "session_id": c.session_id,
        "replica": replica,
        "path": c.path,
        "ttft_ms": round(c.ttft_ms, 3),
        "first_chunk_ms": sent,
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
        "ignored_fields": ignored or [],
        # A gate answer's first token was chosen, and its logprob read, from a cached distribution.
        "first_logprob_cached": bool(c.logprobs and c.logprobs[0].cached),
    }


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (used by SmolLM2 and Qwen2.5): each byte is written as
    one printable character; this maps the characters back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """Token ids as OpenAI's logprobs write them: the text and the exact bytes of each."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._bytes = _byte_level_alphabet()

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and all(ch in self._bytes for ch in piece):  # a byte-level BPE token
            raw = bytes(self._bytes[ch] for ch in piece)
        else:
            raw = self.tokenizer.decode([token]).encode()
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0),
                "bytes": list(raw)}

    def content(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        return [
            {**self.entry(e.token, e.logprob), "top_logprobs": [self.entry(t, lp) for t, lp in e.top]}
            for e in entries
        ]


def token_text(request: Request) -> TokenText:
    state = request.app.state.headstart
    if getattr(state, "token_text", None) is None:
        state.token_text = TokenText(state.require_engine().template.tokenizer)
    return state.token_text


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
    state = request.app.state.headstart
    req, model, handle = await open_request(
        request, ChatCompletionRequest,
        lambda r, sid, owner: r.to_engine(sid, owner, state.config.default_temperature),
    )
    ignored = req.ignored()
    shape = ChatShape(f"chatcmpl-{uuid.uuid4().hex}", model, token_text(request) if req.logprobs else None,
                      state.config.replica)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return stream_response(handle, shape, include_usage, ignored)
    return JSONResponse(await answer(request, handle, shape, ignored))


class ChatShape:
    """How chat completions write an answer: messages and deltas, logprobs as ``content``.
    The text completions door has its own shape; the streaming and collecting are shared."""

    object = "chat.completion"

    def __init__(self, completion_id: str, model: str, tokens: TokenText | None, replica: str | None) -> None:
        self.id, self.model, self.tokens, self.replica = completion_id, model, tokens, replica
        self.created = int(time.time())

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if self.tokens is None:
            return None
        return {"content": self.tokens.content(entries or []), "refusal": None}

    def choice(self, index: int, c: Completion) -> dict[str, Any]:
        return {"index": index, "message": message(c), "logprobs": self.logprobs(c.logprobs),
                "finish_reason": _finish_reason(c)}

    def opening(self, index: int) -> dict[str, Any] | None:
        return self.chunk(index, {"role": "assistant", "content": ""}, None)

    def delta(self, index: int, d: Delta) -> dict[str, Any]:
        return self.chunk(index, {"content": d.text}, None, self.logprobs(d.logprobs))

    def closing(self, index: int, c: Completion) -> list[dict[str, Any]]:
        return [*(self.chunk(index, delta, None) for delta in tool_call_deltas(c)),
                self.chunk(index, {}, _finish_reason(c))]

    def chunk(
        self, index: int, delta: dict[str, Any], finish: str | None, logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {**self.envelope("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}


async def open_request(request: Request, schema: Any, build: Callable[[Any, str | None, str | None], Any]) -> Any:
    """Read the body, then parse and validate it as ``schema``, check its model name, build
    the engine's request (``build(parsed, session_id, owner)``), compile a new output schema and
    submit, all on a worker thread: parsing a long conversation, compiling a schema (seconds)
    and rendering and tokenising would hold the event loop. Returns the parsed request, the
    model name it is answered under and its handle; a client that leaves meanwhile cancels it."""
    from headstart.server.errors import parse_json, read_body

    arrival = arrival_of(request)
    state = request.app.state.headstart
    engine: Engine = state.require_engine()
    body = await read_body(request, state.config.max_body_bytes)
    session_id, owner, names = request.headers.get(SESSION_HEADER) or None, owner_of(request), served_names(request)
    loop = asyncio.get_running_loop()
    opened: list[Handle] = []

    def submit() -> tuple[Any, str]:
        req = schema.model_validate(parse_json(body))
        model = model_name(names, req.model)
        engine_req = build(req, session_id, owner)
        engine_req.arrival = arrival
        if engine_req.params.constraint is not None:
            engine.compile_constraint(engine_req.params.constraint)
        opened.append(engine.submit(engine_req, loop=loop))
        return req, model

    def cancel(_: object) -> None:
        for h in opened:
            for choice in h.choices:
                choice.cancel()

    # The door's own pool, not anyio's: its hand-off goes through a limiter and two event-loop
    # turns before the worker is even woken, on every request's critical path.
    work = state.door.submit(submit)
    try:
        req, model = await asyncio.wrap_future(work)
    except asyncio.CancelledError:  # the client left while the request was being opened
        work.add_done_callback(cancel)  # now, or once the worker has submitted
        raise
    return req, model, opened[0]


async def collect(handle: Handle) -> Completion:
    """The completion at the end of ``handle`` (the deltas before it are dropped)."""
    async for item in handle:
        if isinstance(item, Completion):
            return item
    raise RuntimeError("the engine ended a request without a completion")


def total_usage(completions: list[Completion]) -> dict[str, Any]:
    """One prompt, every choice's tokens."""
    out = usage(completions[0])
    out["completion_tokens"] = sum(c.completion_tokens for c in completions)
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


async def answer(request: Request, handle: Handle, shape: Any, ignored: list[str]) -> dict[str, Any]:
    """The whole answer, every choice (a client that goes away cancels them)."""

    async def every_choice() -> list[Completion]:
        return [await collect(h) for h in handle.choices]

    def cancel() -> None:
        for h in handle.choices:
            h.cancel()

    completions = await unless_gone(request, every_choice(), cancel)
    return {**shape.envelope(shape.object), "choices": [shape.choice(i, c) for i, c in enumerate(completions)],
            "usage": total_usage(completions), "headstart": extension(completions[0], shape.replica, ignored)}


def _sse_line(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def stream_response(handle: Handle, shape: Any, include_usage: bool, ignored: list[str]) -> StreamingResponse:
    return StreamingResponse(_sse(handle, shape, include_usage, ignored), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


async def _sse(handle: Handle, shape: Any, include_usage: bool, ignored: list[str]) -> AsyncIterator[str]:
    """Chunks of every choice in turn; a client that goes away cancels the generation."""
    try:
        completions: list[Completion] = []
        first_chunk_at: float | None = None  # the first chunk with answer text, handed to the server

        def ext() -> dict[str, Any]:
            return extension(completions[0], shape.replica, ignored, first_chunk_at or time.perf_counter(),
                             handle.arrival)

        try:
            for index, h in enumerate(handle.choices):
                opening = shape.opening(index)
                if opening is not None:
                    yield _sse_line(opening)
                async for item in h:
                    if isinstance(item, Delta):
                        yield _sse_line(shape.delta(index, item))
                        # Resumed once the server has written the chunk to the socket.
                        if first_chunk_at is None and item.text:
                            first_chunk_at = time.perf_counter()
                    else:
                        completions.append(item)
                        *calls, final = shape.closing(index, item)
                        for payload in calls:  # a call is answer text too
                            yield _sse_line(payload)
                            first_chunk_at = first_chunk_at or time.perf_counter()
                        if index == len(handle.choices) - 1 and not include_usage:
                            final["headstart"] = ext()
                        yield _sse_line(final)
            if include_usage:
                yield _sse_line({**shape.envelope(shape.chunk(0, {}, None)["object"]), "choices": [],
                                 "usage": total_usage(completions), "headstart": ext()})
        except Exception as exc:  # the headers are gone: report in-band, as OpenAI does
            from headstart.server.errors import to_response

            yield f"data: {to_response(exc).body.decode()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for h in handle.choices:
            h.cancel()


def _model_object(request: Request, name: str) -> dict[str, Any]:
    engine = request.app.state.headstart.require_engine()
    return {"id": name, "object": "model", "created": int(engine.started), "owned_by": "headstart",
            "root": engine.backend.info.name, "max_model_len": engine.context_limit}


async def list_models(request: Request) -> Response:
    """The model this server runs, under each name it answers to."""
    return JSONResponse({"object": "list", "data": [_model_object(request, n) for n in served_names(request)]})


async def get_model(request: Request) -> Response:
    """One served name, or a 404 ``model_not_found``."""
    return JSONResponse(_model_object(request, model_name(served_names(request), request.path_params["model_id"])))


def routes(wrap: Callable) -> list[Route]:
    return [
        Route("/v1/chat/completions", wrap(create_chat_completion), methods=["POST"]),
        Route("/v1/models", wrap(list_models), methods=["GET"]),
        Route("/v1/models/{model_id}", wrap(get_model), methods=["GET"]),
    ]
