"""One compute loop for all model work, foreground before background.

Model work runs on a single thread, one chunk at a time. A job is a generator that does
one chunk (a prefill, one decode step, a few background tokens) per ``next()``.
Foreground jobs are served round-robin, one chunk each, so a long answer never holds
up another session's first token for more than a step; background jobs run only when no
foreground job waits, so a request waits behind background work for at most one chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

log = logging.getLogger("headstart.scheduler")

Steps = Generator[None, None, None]


@dataclass
class Job:
    """A unit of work; ``on_error`` receives what the generator raised."""

    steps: Steps
    submitted: float = field(default_factory=time.perf_counter)
    on_error: Callable[[BaseException], None] | None = None
    # Called (outside the scheduler's lock) when cancel_background drops this job.
    on_cancel: Callable[[], None] | None = None
    # Asked before the first step; False keeps the job queued (a request waiting for room
    # in the KV budget) while later ones go ahead.
    admit: Callable[[], bool] | None = None
    started: float | None = None
    background_wait: float = 0.0
    cancelled: bool = False


class Scheduler:
    """The single model thread and its two queues."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._foreground: deque[Job] = deque()
        self._background: OrderedDict[str, Job] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._running = False
        self.background_wait_ms: deque[float] = deque(maxlen=10_000)
        self.background_chunks = 0
        self.longest_background_chunk = 0.0
        self._busy = False
        # Called with the seconds a foreground job waited behind background chunks, when it starts.
        self.wait_observers: list[Callable[[float], None]] = []
        # Cancelled jobs to close on the model thread, so their cleanup never runs elsewhere.
        self._closing: list[Job] = []

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="headstart-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._foreground.append(job)
            self._cond.notify_all()

    def submit_background(self, key: str, job: Job) -> None:
        """Queue background work under ``key``, replacing any not yet finished."""
        with self._cond:
            old = self._background.pop(key, None)
            if old is not None:
                old.cancelled = True
                self._closing.append(old)
            self._background[key] = job
            self._cond.notify_all()

    def cancel_background(self, key: str) -> bool:
        """Drop ``key``'s background work; what it already computed stays where it is."""
        with self._cond:
            job = self._background.pop(key, None)
            if job is None:
                return False
            job.cancelled = True
            self._closing.append(job)
        if job.on_cancel is not None:
            job.on_cancel()
        return True

    def has_background(self, key: str) -> bool:
        with self._cond:
            return key in self._background

    def idle(self) -> bool:
        with self._cond:
            return not self._foreground and not self._background

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until both queues are empty (tests and benchmarks use this)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle() and not self._busy:
                return True
            time.sleep(0.005)
        return False

    def _close_cancelled(self) -> None:
        with self._cond:
            closing, self._closing = self._closing, []
        for job in closing:
            try:
                job.steps.close()
            except Exception:
                log.exception("closing a cancelled job failed")

    def _admitted(self) -> Job | None:
        """The first foreground job that has started or may start now, taken off the queue.

        Admission runs outside the lock (it may evict, which cancels background work);
        only this thread removes foreground jobs, so the queue cannot shrink meanwhile.
        """
        with self._cond:
            queued = list(self._foreground)
        for job in queued:
            if job.started is not None or job.admit is None or job.admit():
                with self._cond:
                    self._foreground.remove(job)
                return job
        return None

    def _next(self) -> tuple[Job, bool] | None:
        while True:
            job = self._admitted()
            if job is not None:
                return job, True
            with self._cond:
                if not self._running:
                    return None
                if self._foreground and not self._background:
                    # Every queued request waits for room that only a running one frees.
                    self._cond.wait(0.01)
                    continue
                if self._background:
                    key, bg = self._background.popitem(last=False)
                    self._background[key] = bg  # round-robin: back of the line
                    return bg, False
                self._cond.wait()

    def _observe_wait(self, seconds: float) -> None:
        self.background_wait_ms.append(seconds * 1000)
        for observer in self.wait_observers:
            try:
                observer(seconds)
            except Exception:  # an observer must never stop the model thread
                log.exception("wait observer failed")

    def _loop(self) -> None:
        while True:
            self._close_cancelled()
            picked = self._next()
            if picked is None:
                return
            job, foreground = picked
            self._busy = True
            chunk_started = time.perf_counter()
            if job.started is None:
                job.started = chunk_started
                if foreground:
                    self._observe_wait(job.background_wait)
            try:
                next(job.steps)
                done = False
            except StopIteration:
                done = True
            except BaseException as exc:  # a job's failure must not kill the loop
                done = True
                if job.on_error is not None:
                    job.on_error(exc)
                else:
                    log.exception("background job failed")
            finally:
                self._busy = False
            now = time.perf_counter()
            with self._cond:
                if foreground:
                    if not done and not job.cancelled:
                        self._foreground.append(job)
                    continue
                self.background_chunks += 1
                self.longest_background_chunk = max(self.longest_background_chunk, now - chunk_started)
                for waiting in self._foreground:
                    if waiting.started is None:
                        waiting.background_wait += now - max(waiting.submitted, chunk_started)
                if done or job.cancelled:
                    for key, queued in list(self._background.items()):
                        if queued is job:
                            del self._background[key]
                    job.steps.close()
