"""``POST /v1/completions``: the legacy text completions door, as vLLM serves it.

The prompt (text or token ids) is continued as it stands, with no chat template. With an
``x-session-id`` header the session's KV is reused by longest common prefix, as for chat,
but a raw prompt leaves the session's chat transcript and its pre-positioning alone.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from headstart.decode.logits import TokenLogprob
from headstart.engine.output import Completion, Delta
from headstart.server.chat import (
    ChatShape,
    TokenText,
    _finish_reason,
    answer,
    open_request,
    stream_response,
    token_text,
)
from headstart.server.schemas import CompletionRequest


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
    state = request.app.state.headstart
    engine = state.require_engine()

    def build(r: CompletionRequest, session_id: str | None, owner: str | None) -> Any:
        ids = engine.template.encode(r.prompt) if isinstance(r.prompt, str) else list(r.prompt)
        return r.to_engine(ids, session_id, owner, state.config.default_temperature)

    req, model, handle = await open_request(request, CompletionRequest, build)
    ignored = req.ignored()
    echo = "" if not req.echo else req.prompt if isinstance(req.prompt, str) else engine.template.decode(req.prompt)
    shape = TextShape(f"cmpl-{uuid.uuid4().hex}", model, token_text(request) if req.logprobs is not None else None,
                      state.config.replica, echo)
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return await stream_response(request, handle, shape, include_usage, ignored)
    return JSONResponse(await answer(request, handle, shape, ignored))


def routes(wrap: Any) -> list[Route]:
    return [Route("/v1/completions", wrap(create_completion), methods=["POST"])]
