"""API keys: when the server has any, every endpoint but /health and /metrics needs one.

A key comes as ``Authorization: Bearer <key>`` (what the OpenAI clients send) or as
``x-api-key``. The key's owner id (a digest of it, so the key itself is never stored on a
session or logged) goes to ``request.state.owner``; sessions belong to that owner and are
invisible to every other key. A plain ASGI middleware, so streaming responses pass through
untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health", "/metrics"})


def owner_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def read_key_file(path: str | Path) -> list[str]:
    """Keys from a file: one per line; blank lines and ``#`` comments are skipped."""
    keys = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


class APIKeyAuth:
    """Refuse requests without a known key (401, OpenAI's error shape)."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    def _owner(self, scope: Scope) -> str | None:
        headers = dict(scope.get("headers") or [])
        given = None
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            given = value.strip()
        elif headers.get(b"x-api-key"):
            given = headers[b"x-api-key"].strip()
        if given is None:
            return None
        # Compare with every key, in constant time each, so timing tells nothing.
        match = None
        for key in self.keys:
            if hmac.compare_digest(given, key):
                match = key
        return owner_id(match.decode()) if match is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        owner = self._owner(scope)
        if owner is None:
            body = json.dumps({"error": {
                "message": "a valid API key is required (Authorization: Bearer <key> or x-api-key)",
                "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
            }}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ]})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)
