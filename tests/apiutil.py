"""Helpers for the sessions-API tests: a live app around an engine, an SSE reader, a way to
hold the model thread, and a wait for a session's idle-time work."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from headstart.engine.engine import Engine, EngineConfig
from headstart.engine.loop import Job
from headstart.errors import SessionNotFound
from headstart.model import HFBackend
from headstart.server.app import ServerConfig, create_app
from tests.conftest import LiveServer


@dataclass
class Served:
    url: str
    engine: Engine
    client: httpx.Client
    app: Any


@contextlib.contextmanager
def serve(
    backend: HFBackend, *, engine: dict[str, Any] | None = None, sndbuf: int | None = None, **server: Any
) -> Iterator[Served]:
    """A real server on loopback around a fresh engine on ``backend`` (``sndbuf``: see
    :class:`LiveServer`)."""
    built: list[Engine] = []

    def factory() -> Engine:
        e = Engine(backend, config=EngineConfig(**(engine or {})))
        built.append(e)
        return e

    server.setdefault("heartbeat_seconds", 0.2)
    app = create_app(ServerConfig(**server), factory=factory)
    with LiveServer(app, sndbuf=sndbuf) as live, httpx.Client(base_url=live.url, timeout=120) as client:
        yield Served(live.url, built[0], client, app)


def settle(served: Served, session_id: str | None = None, timeout: float = 300) -> None:
    """Wait until the engine has no work left (and the session reports none)."""
    assert served.engine.wait_idle(timeout), "the engine did not go idle"
    if session_id is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = served.engine.get_session(session_id)
            except SessionNotFound:
                return
            if info.data.waiting == 0 and not info.upkeep_queued:
                return
            time.sleep(0.01)
        raise AssertionError("the session did not settle")


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll ``condition`` (sleeping between polls: the server shares this process's GIL)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


class Blocker:
    """Holds the step (no forward, no admission) until released, so tests can queue work
    behind it deterministically. Submitted from a thread of its own: a submit that finds the
    loop idle runs the step's first part on the submitting thread, which is what holds it."""

    def __init__(self, engine: Engine, timeout: float = 60) -> None:
        self.engine = engine
        self.timeout = timeout
        self.inside = threading.Event()
        self.release = threading.Event()

    def _steps(self):  # type: ignore[no-untyped-def]
        self.inside.set()
        self.release.wait(self.timeout)
        yield

    def __enter__(self) -> Blocker:
        threading.Thread(target=self.engine.scheduler.submit, args=(Job(self._steps()),), daemon=True).start()
        assert self.inside.wait(30), "the step did not pick up the blocker"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()


class SSEReader:
    """Reads a Server-Sent Events stream in a thread; ``next(name)`` waits for an event."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.ids: list[int] = []  # the ``id`` of every event that had one, in the order received
        self.status: int | None = None
        self.ended = threading.Event()
        self.failure: BaseException | None = None  # what ended the reader thread, if not the stream's end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=60) as r:
                self.status = r.status_code
                name, data = "message", ""
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("id:"):
                        self.ids.append(int(line[3:]))
                    elif line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif line == "":
                        if data:
                            self.events.put((name, json.loads(data)))
                        name, data = "message", ""
        except BaseException as exc:  # surfaced by next(), not lost with the thread
            self.failure = exc
        finally:
            self.ended.set()

    def __enter__(self) -> SSEReader:
        self._thread.start()
        self.next("subscribed")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def next(self, name: str, timeout: float = 120, where: Any = None) -> dict[str, Any]:
        """The next event called ``name`` (and matching ``where``); others are kept in ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name!r} event within {timeout} s; saw {[n for n, _ in self.seen]}")
            try:
                got, data = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.failure is not None:
                    raise AssertionError(f"the event stream failed: {self.failure!r}") from self.failure
                continue
            self.seen.append((got, data))
            if got == name and (where is None or where(data)):
                return data
