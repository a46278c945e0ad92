"""Errors in the OpenAI shape, with the status each kind of failure deserves.

Every refusal a door makes goes through :func:`error_response`, so a client always gets
``{"error": {"message", "type", "param", "code"}}`` and never a bare 500.
"""

from __future__ import annotations

import json
import logging
import re

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from headstart.errors import (
    BadRequest,
    ContextTooLong,
    SessionBusy,
    SessionExists,
    SessionMoved,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from headstart.session.template import TemplateError

log = logging.getLogger("headstart.server")

# Where a UTF-8 body can spell a UTF-16 surrogate: a JSON escape (\\ud800-\\udfff) or the
# bytes of one encoded as UTF-8 (json.loads decodes a body with "surrogatepass").
_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]")


class HTTPError(Exception):
    """A refusal raised inside a route."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _loc(loc: tuple[object, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def to_response(exc: BaseException) -> JSONResponse:
    """The OpenAI-shaped answer for anything a route raised."""
    if isinstance(exc, HTTPError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        param = _loc(first.get("loc", ()))
        msg = str(first.get("msg")).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        return error_response(400, message, param=param or None, code="invalid_value")
    if isinstance(exc, ContextTooLong):
        return error_response(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, BadRequest):
        return error_response(400, str(exc), param=exc.param, code=getattr(exc, "code", None))
    if isinstance(exc, TemplateError):
        return error_response(400, str(exc), param=exc.param)
    if isinstance(exc, SessionNotFound):
        return error_response(404, str(exc), "not_found_error", code=getattr(exc, "code", "session_not_found"))
    if isinstance(exc, SessionBusy):
        return error_response(409, str(exc), "conflict_error", code="session_busy")
    if isinstance(exc, SessionExists):
        return error_response(409, str(exc), "conflict_error", code=getattr(exc, "code", "session_exists"))
    if isinstance(exc, SessionMoved):
        return error_response(409, str(exc), "conflict_error", code="session_moved")
    if isinstance(exc, TooManySessions):
        return error_response(429, str(exc), "rate_limit_error", code="too_many_sessions")
    if isinstance(exc, StoreUnavailable):
        return error_response(503, str(exc), "service_unavailable", code="store_unavailable")
    if isinstance(exc, RecursionError):
        return error_response(400, "the body is nested too deeply", code="invalid_value")
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, "internal error", "server_error")


async def read_json(request: Request, limit: int) -> object:
    """The request body as JSON: 413 past ``limit`` bytes, 400 when it is not JSON."""
    return parse_json(await read_body(request, limit))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body's bytes: 413 past ``limit``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPError(413, f"request body over {limit} bytes", code="body_too_large")
    return bytes(body)


def parse_json(body: bytes) -> object:
    """A body as JSON: 400 when it is not JSON or holds text no tokenizer can encode
    (a door whose body may be large calls this off its event loop)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise HTTPError(400, "the body is nested too deeply", code="invalid_json") from exc
    if json.detect_encoding(body).startswith("utf-8") and _SURROGATE.search(body) is None:
        return value  # nothing can spell a surrogate: skip encoding the whole value again
    try:
        # JSON escapes can spell lone surrogates, which no tokenizer can encode.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise HTTPError(400, f"the body holds text that is not valid Unicode: {exc.reason}", code="invalid_json") \
            from exc
    except RecursionError as exc:
        raise HTTPError(400, "the body is nested too deeply", code="invalid_json") from exc
    return value
