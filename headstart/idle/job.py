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
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from headstart.decode.sampling import top_gap
from headstart.engine.loop import Job
from headstart.idle import queries
from headstart.idle.ingest import ingest_batch, window_limit
from headstart.idle.prepos import next_role, pre_position
from headstart.session.session import ReadyPosition, Session
from headstart.session.template import common_prefix

if TYPE_CHECKING:
    from headstart.engine.engine import Engine

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


def schedule(engine: Engine, s: Session) -> None:
    """Make sure an upkeep job is queued for ``s`` (call after adding work)."""
    with s.upkeep_lock:
        if s.upkeep_queued and engine.scheduler.has_background(s.id):
            return
        s.upkeep_queued = True
        job = Job(_run(engine, s))
        job.on_cancel = lambda: _interrupted(engine, s)
        job.on_error = lambda exc: _failed(engine, s, exc)
        engine.scheduler.submit_background(s.id, job)


def request_warm(engine: Engine, s: Session, prompt: list[int]) -> WarmTicket:
    """Queue a warm of ``prompt`` on ``s``; a newer warm replaces (cancels) an older one."""
    ticket = WarmTicket(prompt)
    with s.upkeep_lock:
        old, s.warm_ticket = s.warm_ticket, ticket
    if old is not None:
        old.resolve("cancelled", 0)
        engine.stream_stats.add(warm_cancelled=1)
    schedule(engine, s)
    return ticket


def cancel_warm(engine: Engine, s: Session, ticket: WarmTicket) -> None:
    """Drop ``ticket`` if it is still waiting or running (its client left): the job stops
    warming after its current chunk."""
    with s.upkeep_lock:
        if s.warm_ticket is not ticket:
            return
        s.warm_ticket = None
    engine.stream_stats.add(warm_cancelled=1)
    ticket.resolve("cancelled", 0)


def _interrupted(engine: Engine, s: Session) -> None:
    """A foreground request (or a delete) took the session: a waiting warm is cancelled,
    and the KV rows it computed stay for that request to reuse."""
    with s.upkeep_lock:
        ticket, s.warm_ticket = s.warm_ticket, None
        s.upkeep_queued = False
    if ticket is not None:
        engine.stream_stats.add(warm_cancelled=1)
        started = ticket.cached is not None  # else it never ran: nothing was computed
        done = common_prefix(ticket.prompt, list(s.kv_ids)) - ticket.cached if started else 0
        ticket.resolve("cancelled", max(0, done))


def _failed(engine: Engine, s: Session, exc: BaseException) -> None:
    """A stage raised: start the KV over (the transcript stays) and drop the batch in flight,
    so a bad batch cannot fail forever."""
    log.error("upkeep of session %s failed", s.id, exc_info=exc)
    with engine.stats.lock:
        engine.stats.errors += 1
    engine.book.crop(s, 0)
    s.entry_len = None
    for rp in s.ready.values():
        engine.book.discard(rp)
    s.ready.clear()
    s.data.abandon()
    _interrupted(engine, s)


def _has_work(engine: Engine, s: Session) -> bool:
    return s.data.has_work() or bool(queries.stale(s)) or s.warm_ticket is not None or bool(queries.orphaned(s))


def _run(engine: Engine, s: Session) -> Generator[None, None, None]:
    info = engine.backend.info
    chunk = engine.config.background_chunk
    limit = window_limit(info.context_length, engine.config.context_reserve, s.data.window)
    positioned_for: tuple[int, int, int] | None = None  # at most one pre-positioning per context
    while True:
        _drop_orphans(engine, s)
        if s.data.has_work():
            n = yield from ingest_batch(engine.book, engine.template, s, limit, chunk)
            engine.stream_stats.add(ingested=n)
            if n:
                engine.sessions.persist(s)  # the batch joined the session's messages
                counters = s.data.counters()
                s.events.publish("data_updated", {**counters, "ingested_now": n, "tokens": len(s.kv_ids)})
            yield
        for q in queries.stale(s):
            if s.queries.get(q.id) is not q:
                continue  # deleted meanwhile
            ok = yield from queries.evaluate(
                engine.book, engine.template, s, q, chunk=chunk, context_length=engine.context_limit
            )
            engine.stream_stats.add(query_evaluations=1)
            if ok and s.queries.get(q.id) is q:
                s.events.publish("query_answered", _answered(q, s))
            elif not ok:
                s.events.publish("query_failed", {"query_id": q.id, "error": q.error})
            yield
        if s.data.has_work():
            continue
        ticket = s.warm_ticket
        if ticket is not None:
            yield from _warm(engine, s, ticket)
            continue
        context = (s.data.version, s.turns, s.prepos_epoch)
        if context != positioned_for and _needs_prepos(engine, s):
            done = yield from _pre_position(engine, s)
            if done:
                positioned_for = context
                continue
        with s.upkeep_lock:
            if not _has_work(engine, s):
                s.upkeep_queued = False
                return


def _drop_orphans(engine: Engine, s: Session) -> None:
    """Forget the parked states of questions deleted since."""
    for key in queries.orphaned(s):
        engine.book.discard(s.ready.pop(key))


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


def _warm(engine: Engine, s: Session, ticket: WarmTicket) -> Generator[None, None, None]:
    """Prefill ``ticket.prompt`` and park the state at its end as a ready position, so the
    request that sends exactly this prompt is a ``ready_exact`` hit; no token is generated."""
    book = engine.book
    exact = any(rp.ids == ticket.prompt and book.valid(s, rp) for rp in s.ready.values())
    ticket.cached = min(common_prefix(ticket.prompt, s.kv_ids), len(ticket.prompt))
    if exact:
        s.warm_ticket = None
        ticket.resolve("covered", 0)
        engine.stream_stats.add(warm_covered=1)
        return
    steps = book.advance(s, ticket.prompt, background=True, chunk=engine.config.background_chunk)
    try:
        while True:
            next(steps)
            if s.warm_ticket is not ticket:
                return  # cancelled (its client left, or a newer warm came): the rows computed stay
            yield
    except StopIteration as done:
        logits = done.value
    base = len(ticket.prompt) - 1
    token, gap = top_gap(logits)
    rp = ReadyPosition(
        key=WARM_KEY,
        source="warm",
        ids=list(ticket.prompt),
        base=base,
        logits=[logits],
        forced=[],
        token=token,
        gap=gap,
    )
    book.park(s, rp)
    computed = len(ticket.prompt) - min(ticket.cached, base)
    with s.upkeep_lock:
        if s.warm_ticket is ticket:
            s.warm_ticket = None
    ticket.resolve("warmed", computed)
    engine.stream_stats.add(warmed=1, warmed_tokens=computed)


def _needs_prepos(engine: Engine, s: Session) -> bool:
    """Pre-position unless it is off, a warm position is waiting, or the session's "next"
    position was built on the current context (and no one asked for a new one)."""
    if not (engine.config.pre_position and s.settings.pre_position and s.messages):
        return False
    book = engine.book
    warm = s.ready.get(WARM_KEY)
    if warm is not None and book.valid(s, warm):
        return False
    if s.prepos_epoch != s.positioned_epoch:
        return True
    nxt = s.ready.get("next")
    if nxt is None or not book.valid(s, nxt):
        return True
    return s.positioned_entry != engine.template.entry(
        s.messages, next_role(s.messages), tools=s.tools, cache=s.renders
    )


def _pre_position(engine: Engine, s: Session) -> Generator[None, None, bool]:
    """Run the pre-positioning job, giving way as soon as data, a question or a warm arrives.
    True when it ran to the end."""
    epoch = s.prepos_epoch
    entry = engine.template.entry(s.messages, next_role(s.messages), tools=s.tools, cache=s.renders)
    steps = pre_position(engine.book, engine.template, s, engine.prepos_config)
    try:
        for _ in steps:
            if s.data.has_work() or s.warm_ticket is not None or queries.stale(s) or s.prepos_epoch != epoch:
                return False
            yield
    finally:
        steps.close()
    s.positioned_entry = entry
    s.positioned_epoch = epoch
    return True
