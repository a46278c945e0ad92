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
            self._cond.notify_all()  # the model thread closes it even when it has nothing else to do
        if job.on_cancel is not None:
            job.on_cancel()
        return True

    def has_background(self, key: str) -> bool:
        with self._cond:
            return key in self._background

    def idle(self) -> bool:
        with self._cond:
            return not self._foreground and not self._background

    def _settled(self) -> bool:
        """The wait_idle invariant (call with ``_cond`` held): no job is queued, none is in a
        step, and no cancelled job waits to be closed. A job leaves a queue and becomes busy
        in one critical section, and stops being busy only in the one that re-queues or
        drops it, so a job is never in neither place; a gate answer's completion is sent
        inside a step, so its verification step is still queued when the client hears it."""
        return not self._foreground and not self._background and not self._busy and not self._closing

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every submitted job has run its last step (tests and benchmarks)."""
        with self._cond:
            return self._cond.wait_for(self._settled, timeout)

    def _close_cancelled(self) -> None:
        with self._cond:
            closing = list(self._closing)
        if not closing:
            return
        for job in closing:
            try:
                job.steps.close()
            except Exception:
                log.exception("closing a cancelled job failed")
        with self._cond:
            # Only this thread removes from _closing; others only append behind these.
            del self._closing[: len(closing)]
            self._cond.notify_all()

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
                    self._busy = True  # with the removal: wait_idle never sees it in neither place
                return job
        return None

    def _next(self) -> tuple[Job, bool] | None:
        while True:
            self._close_cancelled()
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
                    self._busy = True
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
            picked = self._next()
            if picked is None:
                return
            job, foreground = picked
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
            now = time.perf_counter()
            with self._cond:
                self._busy = False  # in the same critical section that re-queues or drops the job
                self._cond.notify_all()
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
