"""The operations of the sessions API, below HTTP: what a door calls, with the checks they need.

Each function validates against the model and the engine's limits (raising the engine's
errors, which doors map to status codes), changes the session's state, and makes sure the
session's idle-time job (idle/job.py) will pick the work up. Nothing here waits on the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from headstart.config import MIN_WINDOW, QUERY_MAX_TOKENS
from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.engine.output import Handle
from headstart.errors import BadRequest, StoreUnavailable, check_context
from headstart.idle import job as upkeep
from headstart.idle import queries
from headstart.idle.ingest import Entry, PushResult, window_limit
from headstart.session.session import Session
from headstart.session.template import Message, encode_candidates

QUESTION_OVERHEAD = 16  # template tokens around a question (role header, closing, generation prompt)


def context_room(engine: Engine, window: int | None = None) -> int:
    info = engine.backend.info
    return window_limit(info.context_length, engine.config.context_reserve, window)


def open_session(
    engine: Engine,
    session_id: str | None,
    owner: str | None,
    *,
    system: str | None = None,
    pre_position: bool = True,
    window: int | None = None,
    gate: bool | None = None,
    gap_threshold: float | None = None,
) -> Session:
    """Create a session; with a ``system`` prompt its prefill starts in the background."""
    room = context_room(engine)
    if window is not None and not MIN_WINDOW <= window <= room:
        raise BadRequest(
            f"window must be between {MIN_WINDOW} and {room} tokens (the model's context of "
            f"{engine.backend.info.context_length} less {engine.config.context_reserve} kept for questions)",
            param="window",
        )
    if system is not None:
        n = len(engine.template.encode(system))
        cap = context_room(engine, window) // 4
        if n > cap:
            raise BadRequest(f"the system prompt has {n} tokens; this session takes at most {cap}", param="system")

    def setup(s: Session) -> None:
        s.settings.pre_position = pre_position
        s.settings.gate = gate
        s.settings.gap_threshold = gap_threshold
        s.data.window = window
        s.data.max_pending = engine.config.max_pending
        if system is not None:
            s.messages = [{"role": "system", "content": system}]

    s = engine.sessions.create(session_id, owner, setup)  # stored, settings included, before the reply
    engine.schedule_pre_position(s)
    return s


def measure(engine: Engine, s: Session, texts: list[str]) -> list[Entry]:
    """Token counts of pushed texts; each must fit half the session's window.

    Runs the tokenizer, so a door calls it off its event loop.
    """
    cap = context_room(engine, s.data.window) // 2
    entries = []
    for i, text in enumerate(texts):
        n = len(engine.template.encode(text))
        if n > cap:
            raise BadRequest(
                f"entry {i} has {n} tokens; this session takes entries of at most {cap} "
                f"(half of its {context_room(engine, s.data.window)}-token window)",
                param=f"entries[{i}]",
            )
        entries.append(Entry(text, n))
    return entries


def push(engine: Engine, s: Session, entries: list[Entry]) -> PushResult:
    """Queue data entries on ``s``; they are ingested in the background, in order."""
    s.data.max_pending = engine.config.max_pending
    with s.data.lock:  # held until the push is stored: no batch takes it before
        mark = s.data.mark()
        result = s.data.push(entries)
        try:
            engine.sessions.persist(s)  # what the client is told was pushed survives a crash
        except StoreUnavailable:
            s.data.rollback(mark)  # and what it is told failed is not ingested
            raise
    engine.stream_stats.add(pushed=result.pushed, dropped=result.dropped)
    engine.schedule_upkeep(s)
    return result


def add_query(
    engine: Engine,
    s: Session,
    question: str,
    *,
    query_id: str | None = None,
    max_tokens: int = QUERY_MAX_TOKENS,
    fast_answer: list[str] | None = None,
) -> queries.Query:
    """Register a question on ``s``; it is answered in the background now and after each batch."""
    n = len(engine.template.encode(question))
    cap = engine.config.context_reserve - max_tokens - QUESTION_OVERHEAD
    if n > cap:
        raise BadRequest(f"the question has {n} tokens; registered questions take at most {cap}", param="question")
    if fast_answer is not None:
        encode_candidates(engine.template, fast_answer)
    q = queries.register(
        s, question, query_id=query_id, max_tokens=max_tokens, fast_answer=fast_answer, limit=engine.config.max_queries
    )
    _store_or_undo(engine, s, lambda: s.queries.pop(q.id, None))
    return q


def remove_query(engine: Engine, s: Session, query_id: str) -> None:
    q = queries.get(s, query_id)
    with s.data.lock:
        s.queries.pop(q.id, None)
    _store_or_undo(engine, s, lambda: s.queries.setdefault(q.id, q))  # its parked state is dropped on the model thread


def _store_or_undo(engine: Engine, s: Session, undo: Callable[[], object]) -> None:
    """Store ``s`` after a change to its questions, then queue its idle-time work; when the
    store fails, undo the change and refuse, so what a client is told failed never happened."""
    try:
        engine.sessions.persist(s)
    except StoreUnavailable:
        with s.data.lock:
            undo()
        raise
    engine.schedule_upkeep(s)


def ask(
    engine: Engine,
    s: Session,
    prompt: str,
    params: SamplingParams,
    *,
    owner: str | None,
    fast_answer: list[str] | None = None,
    gap_threshold: float | None = None,
    gate: bool | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    arrival: float | None = None,
) -> tuple[Handle, int]:
    """Ask ``prompt`` against ``s``'s current context without changing it (an ephemeral
    request); returns the handle and the data version the question sees. It renders and
    tokenises, so a door calls it off its event loop."""
    if fast_answer is not None:
        encode_candidates(engine.template, fast_answer)
    version = s.data.version
    messages: list[Message] = [*s.messages, {"role": queries.QUESTION_ROLE, "content": prompt}]
    req = Request(
        messages=messages,
        params=params,
        session_id=s.id,
        owner=owner,
        tools=s.tools,
        gate=gate,
        gap_threshold=gap_threshold,
        fast_answer=fast_answer,
        ephemeral=True,
        create=False,
        arrival=arrival,
    )
    return engine.submit(req, loop=loop), version


def warm(engine: Engine, s: Session, req: Request) -> upkeep.WarmTicket:
    """Prefill the request the next turn would send (no generation). It renders and
    tokenises, so a door calls it off its event loop."""
    from headstart.errors import SessionBusy

    if s.busy:
        raise SessionBusy(f"session {s.id!r} has a request in flight")
    prompt = engine.template.render(req.messages, tools=req.tools, cache=s.renders)
    check_context(len(prompt), engine.context_limit)  # --max-context, as for the request this warm prepares
    return upkeep.request_warm(engine.idle, s, prompt)


def describe(engine: Engine, s: Session) -> dict[str, Any]:
    """The session object doors return."""
    out = s.describe()
    out["object"] = "session"
    out["working"] = engine.scheduler.has_background(s.id)
    out["kv_bytes"] = s.kv_bytes()
    out["listeners"] = s.events.listeners
    out["gate"] = gate_state(engine, s)
    return out


def gate_state(engine: Engine, s: Session) -> dict[str, Any]:
    """Where the gate stands for a streamed turn on ``s``, and the calibration of each key
    it rests on (the session's own, the server's)."""
    from headstart.engine.gate import SERVER_KEY, session_key

    decision = engine.gate_decision(s)
    keys = (session_key(s.id), SERVER_KEY)
    return {
        "enabled": engine.gate.enabled and s.settings.gate is not False,
        "open": decision.threshold is not None,
        "threshold": decision.threshold,
        "key": decision.key,
        "reason": decision.reason,
        "target": engine.gate.target,
        "confidence": engine.gate.confidence,
        "keys": {k: engine.gate.calibration(k).describe() for k in keys},
    }
