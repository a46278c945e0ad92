"""Durable writes on their own thread, in the order they were asked for.

The model thread must not wait on SQLite (a transcript's JSON and its commit cost
milliseconds per turn), yet nothing may be acknowledged before it is committed. So a
write is queued here and its future says when it is committed: the engine hands a
finished turn to its client from that future's callback, and a door that acknowledges a
push or a question waits on it. One thread and one queue keep the writes in order, so a
session's later state never lands before an earlier one, and a delete after a save stays
deleted.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("headstart.writer")

_STOP = object()


def done() -> concurrent.futures.Future[None]:
    """A future that is already resolved (nothing to write)."""
    f: concurrent.futures.Future[None] = concurrent.futures.Future()
    f.set_result(None)
    return f


class Writer:
    """One thread that runs durable writes one after another."""

    def __init__(self, name: str = "headstart-writer") -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, write: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        """Queue ``write(*args)``; the future resolves once it has run (or holds its error)."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._pending += 1
        self._queue.put((write, args, future))
        return future

    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has run."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            write, args, future = item
            try:
                write(*args)
            except BaseException as exc:  # the caller hears of it through the future
                log.exception("durable write failed")
                future.set_exception(exc)
            else:
                future.set_result(None)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
