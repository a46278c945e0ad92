"""``POST /v1/completions``: the legacy text completions door, as vLLM serves it.

The prompt (text or token ids) is continued as it stands, with no chat template. With an
``x-session-id`` header the session's KV is reused by longest common prefix, as for chat,
but a raw prompt leaves the session's chat transcript and its pre-positioning alone.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from headstart.engine import Engine
from headstart.handle import Completion, Delta, Handle
from headstart.logits import TokenLogprob
from headstart.server.chat import (
    SESSION_HEADER,
    ChatShape,
    TokenText,
    _finish_reason,
    answer,
    arrival_of,
    model_name,
    owner_of,
    served_names,
    stream_response,
    token_text,
)
from headstart.server.schema import CompletionRequest


class TextShape(ChatShape):
    """Text completions: ``text`` instead of a message, the legacy logprobs layout, and the
    prompt in front of each choice when ``echo`` asks."""

    object = "text_completion"

    def __init__(
        self, completion_id: str, model: str, tokens: TokenText | None, replica: str | None, echo: str
    ) -> None:
        super().__init__(completion_id, model, tokens, replica)
        self.echo = echo

    def legacy(self, entries: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
        """``{tokens, token_logprobs, top_logprobs, text_offset}``, offsets into the choice's text."""
        if self.tokens is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries or []:
            entry = self.tokens.entry(e.token, e.logprob)
            out["tokens"].append(entry["token"])
            out["token_logprobs"].append(entry["logprob"])
            out["top_logprobs"].append({self.tokens.entry(t, lp)["token"]: lp for t, lp in e.top})
            out["text_offset"].append(offset)
            offset += len(entry["token"])
        return out

    def choice(self, index: int, c: Completion) -> dict[str, Any]:
        return {"index": index, "text": self.echo + c.text, "logprobs": self.legacy(c.logprobs, len(self.echo)),
                "finish_reason": _finish_reason(c)}

    def opening(self, index: int) -> dict[str, Any] | None:
        self._offset = len(self.echo)
        return self.text_chunk(index, self.echo, None, None) if self.echo else None

    def delta(self, index: int, d: Delta) -> dict[str, Any]:
        chunk = self.text_chunk(index, d.text, None, self.legacy(d.logprobs, self._offset))
        self._offset += len(d.text)
        return chunk

    def closing(self, index: int, c: Completion) -> list[dict[str, Any]]:
        return [self.text_chunk(index, "", _finish_reason(c), None)]

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.text_chunk(index, delta.get("content", ""), finish, logprobs)

    def text_chunk(self, index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {**self.envelope("text_completion"),
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}


async def create_completion(request: Request) -> Response:
    """Continue a prompt, streamed as SSE when ``stream`` is true."""
    from headstart.server.errors import read_body

    arrival = arrival_of(request)
    state = request.app.state.headstart
    engine = state.require_engine()
    body = await read_body(request, state.config.max_body_bytes)
    session_id = request.headers.get(SESSION_HEADER) or None
    opened: list[Handle] = []
    try:
        req, model, ids = await run_in_threadpool(
            _open, engine, body, served_names(request), session_id, owner_of(request),
            state.config.default_temperature, asyncio.get_running_loop(), arrival, opened,
        )
    except asyncio.CancelledError:  # the client left while the request was being opened
        for h in opened:
            for choice in h.choices:
                choice.cancel()
        raise
    handle = opened[0]
    ignored = req.ignored()
    echo = "" if not req.echo else req.prompt if isinstance(req.prompt, str) else engine.template.decode(ids)
    shape = TextShape(f"cmpl-{uuid.uuid4().hex}", model, token_text(request) if req.logprobs is not None else None,
                      state.config.replica, echo)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return stream_response(handle, shape, include_usage, ignored)
    return JSONResponse(await answer(request, handle, shape, ignored))


def _open(
    engine: Engine,
    body: bytes,
    names: tuple[str, ...],
    session_id: str | None,
    owner: str | None,
    default_temperature: float,
    loop: asyncio.AbstractEventLoop,
    arrival: float,
    opened: list[Handle],
) -> tuple[CompletionRequest, str, list[int]]:
    """Parse, validate, tokenise and submit, on a worker thread (as the chat door does):
    the request, the model name it is answered under and the prompt's ids."""
    from headstart.server.errors import parse_json

    req = CompletionRequest.model_validate(parse_json(body))
    model = model_name(names, req.model)
    ids = engine.template.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    engine_req = req.to_engine(ids, session_id, owner, default_temperature)
    engine_req.arrival = arrival
    if engine_req.params.constraint is not None:
        engine.compile_constraint(engine_req.params.constraint)
    opened.append(engine.submit(engine_req, loop=loop))
    return req, model, ids


def routes(wrap: Any) -> list[Route]:
    return [Route("/v1/completions", wrap(create_completion), methods=["POST"])]
