"""The step loop: one forward per step for every job that needs the model.

A job is a generator that *yields* what it needs computed (a :class:`~headstart.session.book.Need`:
a session, token ids, how many rows of logits) and is sent those rows back; yielding
``None`` gives way for one step. Each step the loop

1. closes cancelled jobs and admits queued requests first come first served (a request
   whose KV reservation does not fit waits; later ones go on);
2. runs every request that has nothing pending up to its next need: answers that need no
   forward (a gate answer, a ``ready_exact`` first token, a ``fast_answer`` pick) go out
   here, at the step boundary, before the forward; a request whose client has left
   (``abandoned``) is thrown :class:`Cancelled` instead of being given budget, so a
   cancelled prompt stops between two chunks of its prefill, not at its first decode;
3. fills the step's token budget (``step_tokens``): one token for every running decode,
   then prefill chunks of waiting requests (an equal share each first, so a short delta is
   never stuck behind a long cold prompt, the rest in arrival order), then idle-time work
   in whatever is left, round-robin over sessions; every prompt is prefilled in chunks;
4. runs ONE forward over all of it and sends each job whose need is complete its rows,
   which runs it on to its next need (a decode's next pick happens right after the
   forward that made its logits).

One thread at a time holds the step: the model thread, or a door that submits a request
while no step is under way and no other request is in flight, and runs 1 and 2 for it
(``Scheduler.submit``).

Idle-time work only ever takes budget no request wants, so a request never waits behind
it: ``background_wait`` counts the steps in which a request's need was left waiting while
background tokens rode along, which the order above keeps at zero.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from headstart.config import CPU_STEP_TOKENS, CUDA_STEP_TOKENS
from headstart.session.book import KVBook, Need, NoRoom, Steps
from headstart.session.session import Session
from headstart.stats import EngineStats

log = logging.getLogger("headstart.scheduler")


def default_step_tokens(device: str) -> int:
    return CUDA_STEP_TOKENS if device.startswith("cuda") else CPU_STEP_TOKENS


class Cancelled(Exception):
    """Thrown into a request's job at a step boundary when its client has left."""


@dataclass
class Job:
    """A unit of work; ``on_error`` receives what the generator raised."""

    steps: Steps
    submitted: float = field(default_factory=time.perf_counter)
    on_error: Callable[[BaseException], None] | None = None
    # Called (outside the loop's lock) when cancel_background drops this job.
    on_cancel: Callable[[], None] | None = None
    # Asked before the first step; False keeps the job queued (a request waiting for room
    # in the KV budget) while later ones go ahead.
    admit: Callable[[], bool] | None = None
    # Asked every step while a request waits for a forward: True (its client left) throws
    # Cancelled into it rather than computing more for nobody.
    abandoned: Callable[[], bool] | None = None
    started: float | None = None
    background_wait: float = 0.0  # seconds its need waited in steps that carried background tokens
    forwards: int = 0  # forwards that computed rows for this job
    cancelled: bool = False
    need: Need | None = None  # what it waits for; None: run it on at the next step


@dataclass
class Step:
    """What one step computed (for the step metrics)."""

    seconds: float
    tokens: int
    background: int
    sequences: int


class Scheduler:
    """The single model thread, its queues, and the step policy."""

    def __init__(self, book: KVBook, stats: EngineStats, step_tokens: int) -> None:
        if step_tokens < 1:
            raise ValueError("step_tokens must be at least 1")
        self.book = book
        self.stats = stats
        self.step_tokens = step_tokens
        self._cond = threading.Condition()
        self._queued: deque[Job] = deque()  # requests not yet admitted
        self._running: list[Job] = []  # admitted requests, in arrival order
        self._background: OrderedDict[str, Job] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._on = False
        self._busy = False  # inside a step
        self._moved = False  # whether this step ran any job on
        self.background_chunks = 0  # steps that carried background tokens
        # Called with the seconds a request waited behind background work, when it ends.
        self.wait_observers: list[Callable[[float], None]] = []
        # Cancelled jobs to close within a step, so their cleanup never runs beside one.
        self._closing: list[Job] = []

    # -- the doors' side ---------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._on:
                return
            self._on = True
        self._thread = threading.Thread(target=self._loop, name="headstart-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._on = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a request. When no step is under way and no other request is in flight,
        the submitting thread runs the step's first part itself (1 and 2 above: admission,
        and the new request up to its first need), so an answer that needs no forward, a
        ``ready_exact`` first token or a gate answer, goes out without waiting for the model
        thread to wake: a wake-up that takes ~0.1 ms, and more after a quiet spell. Forwards
        stay on the model thread, which waits while another thread holds the step. With
        requests in flight the model thread starts this one at its next step, as it would
        anyway: doors arriving one after another never keep it from its forwards."""
        with self._cond:
            self._queued.append(job)
            here = self._on and not self._busy and not self._running and len(self._queued) == 1
            if here:
                self._busy = True
            else:
                self._cond.notify_all()
        if not here:
            return
        try:
            self._prepare()
        except Exception:  # as on the model thread: a bug in the loop must not fail the door
            log.exception("step failed")
        finally:
            with self._cond:
                self._busy = False
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
            return not self._queued and not self._running and not self._background

    def _settled(self) -> bool:
        """The wait_idle invariant (call with ``_cond`` held): no job is queued or running,
        no step is under way, and no cancelled job waits to be closed. Jobs move between the
        queues only inside a step, so a job is never in neither place while no step runs."""
        return not (self._queued or self._running or self._background or self._busy or self._closing)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every submitted job has run its last step (tests and benchmarks)."""
        with self._cond:
            return self._cond.wait_for(self._settled, timeout)

    # -- the model thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._on and (self._busy or self._settled()):  # busy: a door holds the step
                    self._cond.wait()
                if not self._on:
                    return
                self._busy = True
            try:
                worked = self._step()
            except BaseException:  # a bug in the loop itself must not kill the model thread
                log.exception("step failed")
                worked = True
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                if not worked and self._on:
                    # Every queued request waits for room that only a running one frees, or
                    # only cancelled jobs are left: look again shortly.
                    self._cond.wait(0.01)

    def _close_cancelled(self) -> None:
        with self._cond:
            closing = list(self._closing)
        for job in closing:
            try:
                job.steps.close()
            except Exception:
                log.exception("closing a cancelled job failed")
        if closing:
            with self._cond:
                # Only the step's holder removes from _closing; others only append behind these.
                del self._closing[: len(closing)]

    def _prepare(self) -> None:
        """The step's first part (1 and 2 of the module docstring), before any forward."""
        self._close_cancelled()
        self._admit()
        for job in list(self._running):
            if job.need is None:
                self._advance(job)
            if job.need is not None and job.abandoned is not None and job.abandoned():
                self._advance(job, error=Cancelled())

    def _admit(self) -> None:
        """Move every queued request that may start now to the running list, in order.

        Admission runs outside the lock (it may evict, which cancels background work);
        only the step's holder removes queued jobs, so the queue cannot shrink meanwhile."""
        with self._cond:
            queued = list(self._queued)
        for job in queued:
            if job.admit is None or job.admit():
                with self._cond:
                    self._queued.remove(job)
                    self._running.append(job)

    def _advance(self, job: Job, rows: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        """Run ``job`` on to its next need (sending it ``rows``, or raising ``error`` in it)."""
        if job.started is None:
            job.started = time.perf_counter()
        self._moved = True
        try:
            job.need = job.steps.send(rows) if error is None else job.steps.throw(error)
            return
        except StopIteration:
            pass
        except BaseException as exc:  # a job's failure must not stop the loop
            if job.on_error is not None:
                job.on_error(exc)
            else:
                log.exception("background job failed")
        self._end(job)

    def _end(self, job: Job) -> None:
        job.need = None
        with self._cond:
            if job in self._running:
                self._running.remove(job)
                foreground = True
            else:
                foreground = False
                for key, queued in list(self._background.items()):
                    if queued is job:
                        del self._background[key]
        job.steps.close()
        if foreground:
            for observer in self.wait_observers:
                try:
                    observer(job.background_wait)
                except Exception:  # an observer must never stop the model thread
                    log.exception("wait observer failed")

    def _step(self) -> bool:
        """One step (see the module docstring); False when there was nothing to do."""
        began = time.perf_counter()
        self._moved = False
        self._prepare()
        plan: list[tuple[Job, int]] = []
        stepping: set[Session] = set()
        left = self.step_tokens
        requests = [j for j in self._running if j.need is not None]
        decodes = [j for j in requests if len(j.need.ids) == 1]  # type: ignore[union-attr]
        prefills = [j for j in requests if len(j.need.ids) > 1]  # type: ignore[union-attr]
        for job in decodes:  # every running decode gets its token, whatever the budget
            plan.append((job, 1))
            stepping.add(job.need.session)  # type: ignore[union-attr]
            left -= 1
        waiting: list[Job] = []
        for job, n in _share(prefills, left, bool(plan)):
            if n == 0:
                waiting.append(job)
                continue
            plan.append((job, n))
            stepping.add(job.need.session)  # type: ignore[union-attr]
            left -= n
        background = self._plan_background(plan, stepping, left) if left > 0 else 0
        if not plan:
            return self._moved
        pieces = [(job.need, n) for job, n in plan]
        try:
            rows = self.book.run(pieces)  # type: ignore[arg-type]
        except BaseException as exc:  # the forward failed: every job in it hears of it
            for job, _ in plan:
                self._advance(job, error=exc)
            return True
        for (job, _), out in zip(plan, rows, strict=True):
            job.forwards += 1
            if job.need is not None and job.need.left == 0 and not job.cancelled:
                self._advance(job, out)
        seconds = time.perf_counter() - began
        for job in waiting if background else ():
            job.background_wait += seconds  # cannot happen: background only takes what is left
        if background:
            self.background_chunks += 1
        self.stats.record_step(
            Step(seconds, sum(n for _, n in plan), background, len(plan)), self.step_tokens
        )
        return True

    def _plan_background(self, plan: list[tuple[Job, int]], stepping: set[Session], left: int) -> int:
        """Add idle-time work to ``plan`` within ``left`` tokens, round-robin; its tokens."""
        with self._cond:
            jobs = list(self._background.items())
        taken = 0
        claimed = 0  # blocks the step's background pieces allocate from the free pool
        for key, job in jobs:
            if left <= 0:
                break
            if job.cancelled:
                continue
            if job.need is None:
                self._advance(job)
                if job.need is None:
                    continue
            n = _chunk(job.need, left, bool(plan))
            if n == 0:
                continue
            if not self.book.fits(job.need, n, claimed, stepping):
                self._advance(job, error=NoRoom())  # idle work never evicts real state
                continue
            if job.cancelled:  # making room may have cancelled it
                continue
            claimed += job.need.session.kv.blocks_needed(n)
            plan.append((job, n))
            stepping.add(job.need.session)
            left -= n
            taken += n
            with self._cond:  # round-robin: a session that got a turn goes to the back
                if self._background.get(key) is job:
                    self._background.move_to_end(key)
        return taken


def _share(prefills: list[Job], left: int, others: bool) -> list[tuple[Job, int]]:
    """The prefill budget over waiting prompts: each first gets up to an equal share (so a
    short delta never waits behind a long cold prompt: it is done in one step), then what
    is left goes to them in arrival order."""
    if not prefills:
        return []
    share = max(1, left // len(prefills))
    given: dict[int, int] = {}
    for i, job in enumerate(prefills):
        given[i] = _chunk(job.need, min(share, left), others or any(given.values()))  # type: ignore[arg-type]
        left -= given[i]
    for i, job in enumerate(prefills):
        if left <= 0:
            break
        more = _chunk(job.need, given[i] + left, True) if given[i] < job.need.left else given[i]  # type: ignore[union-attr,arg-type]
        if more > given[i]:
            left -= more - given[i]
            given[i] = more
    return [(job, given[i]) for i, job in enumerate(prefills)]


def _chunk(need: Need, left: int, others: bool) -> int:
    """How many of ``need``'s ids fit in ``left`` tokens: all, or a chunk that still leaves
    its last piece the ``keep`` rows it asks for; 0 to wait. A step with nothing else in it
    takes the whole need, so an oversized one never waits forever."""
    n = min(need.left, max(left, 0))
    if 0 < n < need.left and need.left - n < need.keep:
        n = max(0, need.left - need.keep)
    if n == 0 and not others:
        n = need.left
    return n
