"""What Serve's HTTP proxy says when the replica answering a request dies.

Serve's proxy forwards a request to a replica and relays the replica's ASGI messages. When
the replica's actor dies meanwhile, the proxy logs the error and returns without finishing
the response: before the answer started, uvicorn then sends its own plain-text 500; after
it started (a stream), the connection is cut mid-body. Neither tells an OpenAI client what
happened. :class:`ReplicaLost` runs inside the proxy (Serve's ``http_options.middlewares``)
and finishes such a response itself, in the OpenAI error shape: a 502 JSON error before the
answer started, an SSE ``error`` event and a clean end of the stream after. Nothing is
retried here: the dead replica's turn is not applied, and the client decides whether to
send it again (the session's next request goes to a live replica, which takes the session
over from the stored transcript).

A response ends unfinished in the proxy only when its replica stopped answering (the
replica's own app answers every failure of its own in full) or when the client left, which
this tells apart by the client's disconnect message, and then sends nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

STATUS = 502
CODE = "replica_died"
_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")


def lost_error(scope: Scope) -> dict[str, Any]:
    """The OpenAI-shaped error for a request whose replica died before finishing it."""
    headers = dict(scope.get("headers") or [])
    sid = headers.get(b"x-session-id", b"").decode("latin-1") or None
    if sid is None:
        m = _SESSION_PATH.match(scope.get("path", ""))
        sid = m.group(1) if m else None
    whose = f"session {sid!r}" if sid else "this request"
    message = (f"the replica serving {whose} died before it finished answering; the answer was not delivered "
               "and the turn was not applied. Send the request again: a live replica takes the session over "
               "from its stored transcript.")
    return {"error": {"message": message, "type": "server_error", "param": None, "code": CODE}}


class ReplicaLost:
    """Finishes, in the OpenAI error shape, a response its replica left unfinished."""

    def __init__(self, app: ASGI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: list[bytes | None] = []  # the content type, once the response started
        finished = False
        client_left = False

        async def watched_receive() -> Message:
            nonlocal client_left
            message = await receive()
            if message["type"] == "http.disconnect":
                client_left = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start":
                started.append(dict(message.get("headers") or []).get(b"content-type"))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        await self.app(scope, watched_receive, watched_send)
        if finished or client_left:
            return
        error = lost_error(scope)
        if not started:
            body = json.dumps(error).encode()
            await send({"type": "http.response.start", "status": STATUS,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        elif (started[0] or b"").startswith(b"text/event-stream"):
            # OpenAI's clients raise on an ``error`` event; no ``[DONE]``: the answer is not whole.
            event = f"event: error\ndata: {json.dumps(error, separators=(',', ':'))}\n\n".encode()
            await send({"type": "http.response.body", "body": event, "more_body": False})
        # Any other answer goes out in one message: it is whole or was never started.


def middlewares() -> list[Middleware]:
    """The proxy's middlewares (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
    headstart.scaleout.proxy:middlewares`` for a cluster started from a Serve config)."""
    return [Middleware(ReplicaLost)]
