"""A slow event listener never holds the model back: past 256 waiting events its oldest are
dropped, and the other listeners and the session's close reach everyone.

The hub is driven as the server drives it: the publisher is another thread (the model's),
each listener waits on its own running event loop (a door's). Over HTTP a listener's queue
fills only behind some 64 KB of the server's write buffer and the socket buffers, a few
hundred events more than the 256 it holds, which takes a minute of model work on this CPU;
``test_api_sessions.py::test_events_stream`` covers the stream itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from headstart.session.events import Event, EventHub, Listener

QUEUED = 256  # docs/sessions-api.md, Events
PUBLISHED = 300


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A running event loop in a thread of its own, as a door's."""
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join(10)
    running.close()


def _drain(loop: asyncio.AbstractEventLoop, listener: Listener) -> list[Event]:
    """Every event waiting for ``listener`` (none waits past a short timeout)."""
    async def take() -> list[Event]:
        got = []
        while (event := await listener.get(0.2)) is not None:
            got.append(event)
        return got

    return asyncio.run_coroutine_threadsafe(take(), loop).result(30)


def test_a_full_listener_loses_its_oldest_events_and_holds_nothing_back(loop: asyncio.AbstractEventLoop) -> None:
    hub = EventHub()
    slow = hub.subscribe(loop)  # never reads until the end
    fast = hub.subscribe(loop)
    seen: list[Event] = []

    async def read_fast() -> None:
        while (event := await fast.get(30)) is not None:
            seen.append(event)
            if event.name == "closed":
                return

    reading = asyncio.run_coroutine_threadsafe(read_fast(), loop)
    published: list[int] = []

    def publish(name: str, data: dict) -> None:
        """As the model thread does, at the pace of a reader that keeps up."""
        published.append(hub.publish(name, data).id)
        deadline = time.monotonic() + 10
        while len(seen) < len(published) and time.monotonic() < deadline:
            time.sleep(0.0005)

    model = threading.Thread(target=lambda: [publish("data_updated", {"data_version": i + 1})
                                             for i in range(PUBLISHED)])
    model.start()
    model.join(60)
    assert not model.is_alive(), "publishing waited for the listener that does not read"
    assert [e.id for e in seen] == published  # the listener that reads gets every event, in order
    assert slow.dropped == PUBLISHED - QUEUED and hub.listeners == 2
    waiting = _drain(loop, slow)
    assert [e.id for e in waiting] == published[-QUEUED:]  # the newest 256, in order: the oldest went
    assert [e.data["data_version"] for e in waiting] == list(range(PUBLISHED - QUEUED + 1, PUBLISHED + 1))

    # A full listener still learns that the session is gone: its last event is ``closed``.
    for i in range(QUEUED):
        publish("query_answered", {"n": i})
    hub.close()
    reading.result(30)
    assert seen[-1].name == "closed" and len(seen) == PUBLISHED + QUEUED + 1
    waiting = _drain(loop, slow)
    assert len(waiting) == QUEUED and waiting[-1].name == "closed"
    assert [e.data["n"] for e in waiting[:-1]] == list(range(1, QUEUED))
    assert slow.dropped == PUBLISHED - QUEUED + 1 and hub.closed
