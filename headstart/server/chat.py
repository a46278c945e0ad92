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

from headstart.handle import Completion, Delta, Handle
from headstart.logits import TokenLogprob
from headstart.server.schema import ChatCompletionRequest

SESSION_HEADER = "x-session-id"


def owner_of(request: Request) -> str | None:
    """The API key that made the request, when keys are in force (set by the auth layer)."""
    return getattr(request.state, "owner", None)


def served_names(request: Request) -> tuple[str, ...]:
    """The names this server answers to: ``--served-model-name``, else the model's own."""
    state = request.app.state.headstart
    return state.config.served_model_names or (state.require_engine().backend.info.name,)


def model_name(request: Request, requested: str | None) -> str:
    """The name a request asked for (the first served name when it named none); an unknown
    one is a 404 in OpenAI's shape, as vLLM answers it."""
    from headstart.server.errors import HTTPError

    names = served_names(request)
    if requested is None:
        return names[0]
    if requested not in names:
        raise HTTPError(404, f"The model `{requested}` does not exist (this server serves {', '.join(names)}).",
                        "invalid_request_error", param="model", code="model_not_found")
    return requested


def extension(c: Completion, ignored: list[str] | None = None) -> dict[str, Any]:
    """The ``headstart`` object: how the request was served, and what it did not honour."""
    return {
        "session_id": c.session_id,
        "path": c.path,
        "ttft_ms": round(c.ttft_ms, 3),
        "decided_ms": round(c.decided_ms, 3),
        "e2e_ms": round(c.e2e_ms, 3),
        "foreground_wait_ms": round(c.foreground_wait_ms, 3),
        # A gap over a single fast_answer candidate is infinite; JSON has no infinity.
        "logit_gap": c.logit_gap if c.logit_gap is None or math.isfinite(c.logit_gap) else None,
        "speculative": c.speculative,
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
    from headstart.server.errors import read_json

    state = request.app.state.headstart
    engine = state.require_engine()
    body = await read_json(request, state.config.max_body_bytes)
    req = ChatCompletionRequest.model_validate(body)
    model = model_name(request, req.model)
    ignored = req.ignored()
    session_id = request.headers.get(SESSION_HEADER) or None
    engine_req = req.to_engine(session_id, owner_of(request), state.config.default_temperature)
    handle = engine.submit(engine_req, loop=asyncio.get_running_loop())
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    tokens = token_text(request) if req.logprobs else None
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        stream = _sse(handle, completion_id, created, model, include_usage, ignored, tokens)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    try:
        completion = await _collect(handle)
    except asyncio.CancelledError:
        handle.cancel()
        raise
    body_out = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message(completion),
                "logprobs": {"content": tokens.content(completion.logprobs or []), "refusal": None}
                if tokens is not None else None,
                "finish_reason": _finish_reason(completion),
            }
        ],
        "usage": usage(completion),
        "headstart": extension(completion, ignored),
    }
    return JSONResponse(body_out)


async def _collect(handle: Handle) -> Completion:
    async for item in handle:
        if isinstance(item, Completion):
            return item
    raise RuntimeError("the engine ended a request without a completion")


def _chunk(
    completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                     "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}],
    }


def _sse_line(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _sse(
    handle: Handle, completion_id: str, created: int, model: str, include_usage: bool, ignored: list[str],
    tokens: TokenText | None,
) -> AsyncIterator[str]:
    """OpenAI chunks; a client that goes away cancels the generation."""
    try:
        yield _sse_line(_chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None))
        try:
            async for item in handle:
                if isinstance(item, Delta):
                    lp = tokens.content(item.logprobs or []) if tokens is not None else None
                    yield _sse_line(_chunk(completion_id, created, model, {"content": item.text}, None, lp))
                else:
                    for delta in tool_call_deltas(item):
                        yield _sse_line(_chunk(completion_id, created, model, delta, None))
                    last = _chunk(completion_id, created, model, {}, _finish_reason(item))
                    if include_usage:
                        yield _sse_line(last)
                        last = {**_chunk(completion_id, created, model, {}, None), "choices": [],
                                "usage": usage(item)}
                    last["headstart"] = extension(item, ignored)
                    yield _sse_line(last)
        except Exception as exc:  # the headers are gone: report in-band, as OpenAI does
            from headstart.server.errors import to_response

            yield f"data: {to_response(exc).body.decode()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


def _model_object(request: Request, name: str) -> dict[str, Any]:
    engine = request.app.state.headstart.require_engine()
    return {"id": name, "object": "model", "created": int(engine.started), "owned_by": "headstart",
            "root": engine.backend.info.name, "max_model_len": engine.context_limit}


async def list_models(request: Request) -> Response:
    """The model this server runs, under each name it answers to."""
    return JSONResponse({"object": "list", "data": [_model_object(request, n) for n in served_names(request)]})


async def get_model(request: Request) -> Response:
    """One served name, or a 404 ``model_not_found``."""
    return JSONResponse(_model_object(request, model_name(request, request.path_params["model_id"])))


def routes(wrap: Callable) -> list[Route]:
    return [
        Route("/v1/chat/completions", wrap(create_chat_completion), methods=["POST"]),
        Route("/v1/models", wrap(list_models), methods=["GET"]),
        Route("/v1/models/{model_id}", wrap(get_model), methods=["GET"]),
    ]
