"""``GET /openapi.json``: every endpoint, with schemas taken from the pydantic models the
routes validate with and answer through, so the document cannot drift from the code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from headstart import __version__
from headstart.engine import sessions as sessionapi
from headstart.server import sessions
from headstart.server.schemas import ChatCompletionRequest, CompletionRequest, ErrorResponse, Health

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Doc:
    method: str
    path: str
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    media: str = "application/json"
    open: bool = False  # needs no API key
    raw: dict[str, Any] | None = None  # a response schema written by hand


CHAT_RESPONSE = {
    "type": "object",
    "description": "an OpenAI chat completion, plus a `headstart` object (path, ttft_ms, logit_gap, ...); "
    "with `stream: true`, Server-Sent Events of chat.completion.chunk objects ending in `data: [DONE]`",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
        "headstart": {"type": "object"},
    },
}
COMPLETION_RESPONSE = {
    "type": "object",
    "description": "an OpenAI text completion plus a `headstart` object; with `stream: true`, Server-Sent Events",
    "properties": {"id": {"type": "string"}, "object": {"const": "text_completion"},
                   "choices": {"type": "array", "items": {"type": "object"}}, "usage": {"type": "object"}},
}
MODEL_RESPONSE = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}
MODELS_RESPONSE = {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array"}}}


def operations() -> list[Doc]:
    docs = [
        Doc("GET", "/health", "Liveness and model state (no key needed)", None, Health, open=True),
        Doc("GET", "/metrics", "Prometheus metrics (no key needed)", media="text/plain", open=True,
            raw={"type": "string"}),
        Doc("GET", "/openapi.json", "This document", raw={"type": "object"}),
        Doc("GET", "/v1/models", "The model this server runs, under each name it answers to", raw=MODELS_RESPONSE),
        Doc("GET", "/v1/models/{model_id}", "One served model name (404 model_not_found otherwise)",
            raw=MODEL_RESPONSE),
        Doc("POST", "/v1/chat/completions",
            "OpenAI chat completions; the x-session-id header joins (or creates) a session",
            ChatCompletionRequest, raw=CHAT_RESPONSE),
        Doc("POST", "/v1/completions",
            "OpenAI text completions (a prompt as text or token ids, no chat template); x-session-id reuses a "
            "session's KV", CompletionRequest, raw=COMPLETION_RESPONSE),
    ]
    for e in sessions.ENDPOINTS:
        docs.append(Doc(e.method, e.path, e.summary, e.body, e.response,
                        media="text/event-stream" if e.stream else "application/json",
                        raw={"type": "string", "description": _events_doc()} if e.stream else None))
    return docs


def _events_doc() -> str:
    return (
        "event: subscribed | data_updated | query_answered | query_failed | heartbeat | closed; "
        "data: a JSON object. query_answered carries query_id, value, confidence and data_version."
    )


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(
        model="ErrorResponse")}}}}


def document(window_max: int | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``window_max``, the largest session window the loaded model
    allows, is stated as that field's maximum."""
    ops = operations()
    models = {ErrorResponse, Health}
    for d in ops:
        models.update(m for m in (d.body, d.response) if m is not None)
    modes = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
    modes += [(m, "serialization") for m in sorted(models, key=lambda m: m.__name__)]
    refs, defs = models_json_schema(modes, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for d in ops:
        op: dict[str, Any] = {"summary": d.summary, "operationId": _op_id(d)}
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in ("session_id", "query_id", "model_id")
            if "{" + name + "}" in d.path
        ]
        if d.path in ("/v1/chat/completions", "/v1/completions"):
            params.append({"name": "x-session-id", "in": "header", "required": False, "schema": {
                "type": "string", "pattern": r"^[A-Za-z0-9_-]{1,128}$"}})
        if params:
            op["parameters"] = params
        if d.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(d.body, "validation")]}}}
        schema = d.raw if d.raw is not None else refs[(d.response, "serialization")] if d.response else {}
        op["responses"] = {
            "200": {"description": "OK", "content": {d.media: {"schema": schema}}},
            "400": _error("malformed JSON, or a field that fails validation (named in `param`)"),
            "404": _error("no such session or question (or it belongs to another key)"),
            "409": _error("a request is in flight on the session, or the id exists"),
            "413": _error("the body is over the size limit"),
            "503": _error("the model is still loading, or the session store cannot be written (nothing was saved)"),
        }
        if not d.open:
            op["responses"]["401"] = _error("a valid API key is required (when the server has keys)")
            op["security"] = [{"bearer": []}, {"apiKey": []}]
        paths.setdefault(d.path, {})[d.method.lower()] = op
    schemas = defs.get("$defs", {})
    if window_max is not None:
        window = schemas["CreateSessionRequest"]["properties"]["window"]
        next(a for a in window["anyOf"] if a.get("type") == "integer")["maximum"] = window_max
    return {
        "openapi": "3.1.0",
        "info": {"title": "headstart", "version": __version__,
                 "description": "A stateful LLM inference server that works while it waits."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


def _op_id(d: Doc) -> str:
    words = [w for w in d.path.replace("{", "").replace("}", "").split("/") if w and w != "v1"]
    return d.method.lower() + "_" + "_".join(w.replace(".", "_").replace("-", "_") for w in words)


async def openapi(request: Request) -> Response:
    doc = getattr(request.app.state, "openapi", None)
    if doc is None:
        engine = request.app.state.headstart.engine
        doc = document(window_max=sessionapi.context_room(engine) if engine is not None else None)
        if engine is not None:  # kept once the model's limits are in it
            request.app.state.openapi = doc
    return JSONResponse(doc)
