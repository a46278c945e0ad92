"""A session's idle-time work, as one background job that knows what is left to do.

Everything a session does between requests runs in one job on the scheduler, keyed by the
session id, because every stage works on the same KV: (1) ingest waiting data, one batch
at a time; (2) after each batch, answer the registered questions whose answer is stale;
(3) prefill a warm request if a client sent one; (4) pre-position for the next turn. The
job derives its work from the session's state each time round, so it can be interrupted
anywhere (a foreground request for the session cancels it) and simply be queued again.

Queueing is idempotent: :func:`schedule` queues a job only when none is queued; a job
that runs out of work says so under the same lock that producers use after adding work,
so work added as a job finishes is never left behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from headstart.idle import queries
from headstart.idle.ingest import ingest_batch, window_limit
from headstart.idle.prepos import PreposConfig, next_role, pre_position
from headstart.session.book import KVBook, Steps
from headstart.session.session import Session
from headstart.session.template import ChatTemplate, common_prefix
from headstart.stats import EngineStats, StreamStats

log = logging.getLogger("headstart.upkeep")

WARM_KEY = "warm"


@dataclass
class WarmTicket:
    """A client's request to prefill ``prompt``; the door waits on ``future``.

    The result is a dict with ``status`` (warmed | covered | cancelled), the prompt's length,
    how many of its tokens were already held and how many the warm computed.
    """

    prompt: list[int]
    future: concurrent.futures.Future[dict[str, Any]] = field(default_factory=concurrent.futures.Future)
    cached: int | None = None

    def resolve(self, status: str, computed: int) -> None:
        result = {
            "status": status,
            "prompt_tokens": len(self.prompt),
            "cached_tokens": self.cached if self.cached is not None else 0,
            "warmed_tokens": computed,
        }
        # Resolved already when it finished and was cancelled at the same moment.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.future.set_result(result)


@dataclass(frozen=True)
class IdleWork:
    """What the idle job uses of the engine, and no more (the engine builds one)."""

    book: KVBook
    template: ChatTemplate
    # The model loop, seen from below: queue a session's job (steps, on_cancel, on_error),
    # replacing any it has; and whether one is queued.
    queue: Callable[[str, Steps, Callable[[], None], Callable[[BaseException], None]], None]
    queued: Callable[[str], bool]
    stats: EngineStats
    stream_stats: StreamStats
    persist: Callable[[Session], None]  # commit a session's durable part
    prepos: PreposConfig
    stop: frozenset[int]  # the ends of an answer
    pre_position: bool  # the server's switch
    context_length: int  # the model's: ingest's window is kept within it
    context_limit: int  # what a prompt may hold (--max-context)
    context_reserve: int  # tokens of context kept free for questions

    @property
    def chunk(self) -> int:
        return self.prepos.chunk


def schedule(idle: IdleWork, s: Session) -> None:
    """Make sure an upkeep job is queued for ``s`` (call after adding work)."""
    with s.upkeep_lock:
        if s.upkeep_queued and idle.queued(s.id):
            return
        s.upkeep_queued = True
        idle.queue(s.id, _run(idle, s), lambda: _interrupted(idle, s), lambda exc: _failed(idle, s, exc))


def request_warm(idle: IdleWork, s: Session, prompt: list[int]) -> WarmTicket:
    """Queue a warm of ``prompt`` on ``s``; a newer warm replaces (cancels) an older one."""
    ticket = WarmTicket(prompt)
    with s.upkeep_lock:
        old, s.warm_ticket = s.warm_ticket, ticket
    if old is not None:
        old.resolve("cancelled", 0)
        idle.stream_stats.add(warm_cancelled=1)
    schedule(idle, s)
    return ticket


def cancel_warm(idle: IdleWork, s: Session, ticket: WarmTicket) -> None:
    """Drop ``ticket`` if it is still waiting or running (its client left): the job stops
    warming after its current chunk."""
    with s.upkeep_lock:
        if s.warm_ticket is not ticket:
            return
        s.warm_ticket = None
    idle.stream_stats.add(warm_cancelled=1)
    ticket.resolve("cancelled", 0)


def _interrupted(idle: IdleWork, s: Session) -> None:
    """A foreground request (or a delete) took the session: a waiting warm is cancelled,
    and the KV rows it computed stay for that request to reuse."""
    with s.upkeep_lock:
        ticket, s.warm_ticket = s.warm_ticket, None
        s.upkeep_queued = False
    if ticket is not None:
        idle.stream_stats.add(warm_cancelled=1)
        started = ticket.cached is not None  # else it never ran: nothing was computed
        done = common_prefix(ticket.prompt, list(s.kv_ids)) - ticket.cached if started else 0
        ticket.resolve("cancelled", max(0, done))


def _failed(idle: IdleWork, s: Session, exc: BaseException) -> None:
    """A stage raised: start the KV over (the transcript stays) and drop the batch in flight,
    so a bad batch cannot fail forever."""
    log.error("upkeep of session %s failed", s.id, exc_info=exc)
    with idle.stats.lock:
        idle.stats.errors += 1
    idle.book.reset(s)
    s.data.abandon()
    _interrupted(idle, s)


def _has_work(idle: IdleWork, s: Session) -> bool:
    return s.data.has_work() or bool(queries.stale(s)) or s.warm_ticket is not None or bool(queries.orphaned(s))


def _run(idle: IdleWork, s: Session) -> Steps:
    chunk = idle.chunk
    limit = window_limit(idle.context_length, idle.context_reserve, s.data.window)
    positioned_for: tuple[int, int, int] | None = None  # at most one pre-positioning per context
    while True:
        _drop_orphans(idle, s)
        if s.data.has_work():
            n = yield from ingest_batch(idle.book, idle.template, s, limit, chunk)
            idle.stream_stats.add(ingested=n)
            if n:
                idle.persist(s)  # the batch joined the session's messages
                counters = s.data.counters()
                s.events.publish("data_updated", {**counters, "ingested_now": n, "tokens": len(s.kv_ids)})
            yield
        for q in queries.stale(s):
            if s.queries.get(q.id) is not q:
                continue  # deleted meanwhile
            ok = yield from queries.evaluate(
                idle.book, idle.template, s, q, chunk=chunk, context_length=idle.context_limit,
                stop=idle.stop,
            )
            idle.stream_stats.add(query_evaluations=1)
            if ok and s.queries.get(q.id) is q:
                s.events.publish("query_answered", _answered(q, s))
            elif not ok:
                s.events.publish("query_failed", {"query_id": q.id, "error": q.error})
            yield
        if s.data.has_work():
            continue
        ticket = s.warm_ticket
        if ticket is not None:
            yield from _warm(idle, s, ticket)
            continue
        context = (s.data.version, s.turns, s.prepos_epoch)
        if context != positioned_for and _needs_prepos(idle, s):
            done = yield from _pre_position(idle, s)
            if done:
                positioned_for = context
                continue
        with s.upkeep_lock:
            # A new pre-positioning asked for since the check above (a hint, a turn) finds
            # this job still queued and queues none: it is this job's to do.
            if not _has_work(idle, s) and context == (s.data.version, s.turns, s.prepos_epoch):
                s.upkeep_queued = False
                return


def _drop_orphans(idle: IdleWork, s: Session) -> None:
    """Forget the parked states of questions deleted since."""
    for key in queries.orphaned(s):
        idle.book.discard(s.ready.pop(key))


def _answered(q: queries.Query, s: Session) -> dict[str, Any]:
    return {
        "query_id": q.id,
        "question": q.question,
        "value": q.value,
        "confidence": q.confidence,
        "candidate": q.candidate,
        "data_version": q.data_version,
        "fresh": q.fresh(s),
    }


def _warm(idle: IdleWork, s: Session, ticket: WarmTicket) -> Steps:
    """Prefill ``ticket.prompt`` and park the state at its end as a ready position, so the
    request that sends exactly this prompt is a ``ready_exact`` hit; no token is generated."""
    book = idle.book
    exact = any(rp.ids == ticket.prompt and book.valid(s, rp) for rp in s.ready.values())
    ticket.cached = min(common_prefix(ticket.prompt, s.kv_ids), len(ticket.prompt))
    if exact:
        s.warm_ticket = None
        ticket.resolve("covered", 0)
        idle.stream_stats.add(warm_covered=1)
        return
    logits = yield from _unless(book.advance(s, ticket.prompt, background=True, chunk=idle.chunk),
                                lambda: s.warm_ticket is not ticket)
    if logits is None:
        return  # cancelled (its client left, or a newer warm came): the rows computed stay
    base = len(ticket.prompt) - 1
    book.park(s, WARM_KEY, "warm", ticket.prompt, base, [logits], [])
    computed = len(ticket.prompt) - min(ticket.cached, base)
    with s.upkeep_lock:
        if s.warm_ticket is ticket:
            s.warm_ticket = None
    ticket.resolve("warmed", computed)
    idle.stream_stats.add(warmed=1, warmed_tokens=computed)


def _unless(steps: Steps, stop: Callable[[], bool]) -> Steps:
    """Run ``steps`` (passing its needs through), checking ``stop`` after each one; its result,
    or None when ``stop`` said so first (``steps`` is closed then)."""
    rows = None
    try:
        while True:
            need = steps.send(rows)
            if stop():
                return None
            rows = yield need
            if stop():
                return None
    except StopIteration as finished:
        return finished.value
    finally:
        steps.close()


def _needs_prepos(idle: IdleWork, s: Session) -> bool:
    """Pre-position unless it is off, a warm position is waiting, or the session's "next"
    position was built on the current context (and no one asked for a new one)."""
    if not (idle.pre_position and s.settings.pre_position and s.messages):
        return False
    book = idle.book
    warm = s.ready.get(WARM_KEY)
    if warm is not None and book.valid(s, warm):
        return False
    if s.prepos_epoch != s.positioned_epoch:
        return True
    nxt = s.ready.get("next")
    if nxt is None or not book.valid(s, nxt):
        return True
    return s.positioned_entry != idle.template.entry(
        s.messages, next_role(s.messages), tools=s.tools, cache=s.renders
    )


def _pre_position(idle: IdleWork, s: Session) -> Generator[None, None, bool]:
    """Run the pre-positioning job, giving way as soon as data, a question or a warm arrives.
    True when it ran to the end."""
    epoch = s.prepos_epoch
    entry = idle.template.entry(s.messages, next_role(s.messages), tools=s.tools, cache=s.renders)
    steps = pre_position(idle.book, idle.template, s, idle.prepos, idle.stop)
    interrupted = False

    def newer() -> bool:
        nonlocal interrupted
        interrupted = s.data.has_work() or s.warm_ticket is not None or bool(queries.stale(s)) or (
            s.prepos_epoch != epoch
        )
        return interrupted

    yield from _unless(steps, newer)
    if interrupted:
        return False
    s.positioned_entry = entry
    s.positioned_epoch = epoch
    return True
