"""A client that leaves before its (non-streamed) answer stops the work done for it.

ASGI servers do not cancel a route whose client disconnected while it waits; a streamed
answer notices when a write fails, a JSON answer would be computed to the end for nobody
and hold its session meanwhile. So a route that waits on the model races that wait against
the ``http.disconnect`` message, and stops the work as soon as it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request

from headstart.server.errors import HTTPError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body was read already: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T], stop: Callable[[], None]) -> T:
    """``await work``; if the client disconnects first, ``stop()`` the work and give up
    (the answer, a 499 nobody reads, goes nowhere)."""
    waiting = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        stop()
        waiting.cancel()
        raise
    finally:
        gone.cancel()
    if waiting.done():
        return waiting.result()
    stop()
    waiting.cancel()
    raise HTTPError(499, "the client closed the connection before the answer", code="client_closed_request")
