"""Per-session event fan-out, from the model thread to any number of listeners.

Background work (ingestion, registered questions) happens on the model thread, while
listeners are coroutines on an event loop (a door's Server-Sent Events stream). A
listener owns a bounded asyncio queue; publishing hands each event to the listener's
loop with ``call_soon_threadsafe`` (the pattern of engine/output.py), so the model thread never
blocks on a slow listener: when a queue is full its oldest event is dropped and the drop
is counted on the listener.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One thing that happened to a session. ``name`` is ``data_updated``,
    ``query_answered`` or ``closed`` (the session is gone; listeners should end)."""

    id: int
    name: str
    data: dict[str, Any]
    at: float = field(default_factory=time.time)


class Listener:
    """One subscriber: a bounded queue on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self.dropped = 0

    def _put(self, event: Event) -> None:
        """Runs on the listener's loop."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


class EventHub:
    """The listeners of one session."""

    def __init__(self, maxsize: int = 256) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._maxsize = maxsize
        self.closed = False

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Listener:
        listener = Listener(loop, self._maxsize)
        with self._lock:
            self._listeners.append(listener)
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._listeners)

    def publish(self, name: str, data: dict[str, Any]) -> Event:
        """Hand ``name`` to every listener; callable from any thread."""
        with self._lock:
            event = Event(next(self._ids), name, data)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener.loop.call_soon_threadsafe(listener._put, event)
            except RuntimeError:  # the listener's loop is closed: it is gone
                self.unsubscribe(listener)
        return event

    def close(self) -> None:
        """The session is deleted: tell listeners to end."""
        self.closed = True
        self.publish("closed", {})
