"""Sessions over their whole life: created, found, kept within memory, stored, expired.

The engine asks the registry for a session when a request arrives and hands it back when
the request is done; in between the session is busy and nothing evicts it. Everything
a client was told (a session exists, a turn succeeded) is in the store before the
client hears it; KV is only a cache of it and may be evicted, spilled or lost.

With a shared store (one opened with a ``holder``: a replica among several) the store, not
this registry, says which sessions exist: each lookup claims the session for this replica,
taking it over from the transcript when another replica held it since, and a replica whose
claim went stale drops its copy at its next write (``SessionMoved``) rather than overwrite
the newer holder's turns.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from headstart.config import IDLE_EXPIRY_S, MAX_SESSIONS
from headstart.errors import (
    BadRequest,
    SessionBusy,
    SessionExists,
    SessionMoved,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from headstart.kv import BlockPool
from headstart.kv.spill import Spill
from headstart.session.book import KVBook
from headstart.session.evict import Budget, Eviction
from headstart.session.session import Session
from headstart.session.store import StaleClaim, TranscriptStore

log = logging.getLogger("headstart.registry")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
INVALID_ID = "a session id is 1-128 characters of A-Z a-z 0-9 _ -"


class IdleWork(Protocol):
    """What the registry asks of the model thread's loop: a request or an eviction takes a
    session over from its idle-time work."""

    def cancel_background(self, key: str) -> bool: ...


@dataclass(frozen=True)
class Limits:
    max_sessions: int = MAX_SESSIONS
    idle_expiry_s: float = IDLE_EXPIRY_S


@dataclass
class EvictionCounts:
    ready: int = 0
    kv: int = 0
    spilled: int = 0
    reloaded: int = 0
    expired: int = 0


class SessionRegistry:
    """All sessions of one engine, with their memory budget and durable store."""

    def __init__(
        self,
        pool: BlockPool,
        book: KVBook,
        scheduler: IdleWork,
        budget: Budget,
        limits: Limits,
        store: TranscriptStore | None = None,
        spill: Spill | None = None,
    ) -> None:
        self.pool = pool
        self.book = book
        self.scheduler = scheduler
        self.budget = budget
        self.limits = limits
        self.store = store
        self.spill = spill
        self.evictions = EvictionCounts()
        self._sessions: dict[str, Session] = {}
        self._oneoff: set[Session] = set()  # sessionless requests being served: their KV counts too
        self._lock = threading.Lock()
        self.shared = store is not None and store.holder is not None
        if store is not None and not self.shared:
            for stored in store.load_all():
                self._sessions[stored.id] = Session.from_stored(stored, pool)

    # -- finding and making ------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def _holding_kv(self) -> list[Session]:
        """Every session whose KV counts against the budget, one-off requests included."""
        with self._lock:
            return [*self._sessions.values(), *self._oneoff]

    def find(self, session_id: str) -> Session | None:
        """This replica's copy of a session, if it holds one, whoever owns it (for caches whose
        use cannot change a result; use get or acquire for anything a caller may see)."""
        with self._lock:
            return self._sessions.get(session_id)

    def one_off(self, s: Session) -> None:
        """Count a sessionless request's KV while it is served."""
        with self._lock:
            self._oneoff.add(s)

    def visible(self, owner: str | None) -> list[Session]:
        """The caller's sessions; with a shared store, every replica's (a session this one
        does not hold is described from its transcript, with no KV)."""
        sessions = self.all()
        if self.shared:
            assert self.store is not None
            mine = {s.id: s for s in sessions}
            sessions = []
            for stored in self.store.load_all():
                s = mine.get(stored.id)
                held = s is not None and s.epoch == stored.epoch
                sessions.append(s if held else Session.from_stored(stored, self.pool))
        return [s for s in sessions if s.owner is None or s.owner == owner]

    def create(
        self, session_id: str | None, owner: str | None, setup: Callable[[Session], None] | None = None
    ) -> Session:
        """A new session, stored before anyone is told it exists."""
        session_id = session_id or uuid.uuid4().hex
        if not SESSION_ID.match(session_id):
            raise BadRequest(INVALID_ID, param="id")
        self.reap()
        if self.shared:
            self._claim(session_id)
        with self._lock:
            if session_id in self._sessions:
                raise SessionExists(f"session {session_id!r} already exists")
            self._check_room()
            s = Session(session_id, self.pool, owner)
            if setup is not None:
                setup(s)
            self._sessions[session_id] = s
        self._persist_new(s)
        return s

    def get(self, session_id: str, owner: str | None) -> Session:
        """A session the caller may see; another owner's session does not exist for it."""
        if self.shared:
            s = self._claim(session_id)
        else:
            with self._lock:
                s = self._sessions.get(session_id)
        if s is None or (s.owner is not None and s.owner != owner):
            raise SessionNotFound(f"no session {session_id!r}")
        return s

    def acquire(self, session_id: str, owner: str | None, create: bool) -> Session:
        """The session a request will run on, marked busy (409 if it already is)."""
        if not SESSION_ID.match(session_id):
            raise BadRequest(INVALID_ID, param="x-session-id")
        if self.shared:
            self._claim(session_id)
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None and s.owner is not None and s.owner != owner:
                raise SessionNotFound(f"no session {session_id!r}")
            fresh = s is None
            if fresh:
                if not create:
                    raise SessionNotFound(f"no session {session_id!r}")
                self._check_room()
                s = Session(session_id, self.pool, owner)
                self._sessions[session_id] = s
            assert s is not None
            if s.busy:
                raise SessionBusy(f"session {session_id!r} has a request in flight")
            s.busy = True
            s.last_used = time.time()
        if fresh:
            try:
                self._persist_new(s)
            except SessionExists as exc:  # another replica created it this instant
                raise SessionMoved(str(exc)) from exc
        self.scheduler.cancel_background(s.id)  # a request takes over from idle-time work
        return s

    def release(self, s: Session) -> None:
        with self._lock:
            self._oneoff.discard(s)
            s.busy = False
            if s.reserved is not None:
                s.reserved.release()
                s.reserved = None
            s.last_used = time.time()

    def _check_room(self) -> None:
        if len(self._sessions) >= self.limits.max_sessions:
            raise TooManySessions(
                f"the server holds its maximum of {self.limits.max_sessions} sessions; delete one or retry later"
            )

    def persist(self, s: Session) -> None:
        """Commit a session's durable part (call before acknowledging anything about it).
        Raises :class:`StoreUnavailable` when the store cannot commit: the caller then undoes
        its change and refuses the request."""
        if self.store is None:
            return
        try:
            self.store.save(s.to_stored())
        except StaleClaim as exc:
            self._drop(s)
            raise SessionMoved(f"session {s.id!r} moved to another replica: {exc}; retry the request") from exc

    def _persist_new(self, s: Session) -> None:
        """Store a session just made; one that cannot be stored does not exist. With a shared
        store it is created claimed by this replica at epoch 1, unless another made it first."""
        try:
            if not self.shared:
                self.persist(s)
                return
            assert self.store is not None
            s.epoch = 1
            if not self.store.insert(s.to_stored()):
                self._drop(s)
                raise SessionExists(f"session {s.id!r} already exists")
        except StoreUnavailable:
            with self._lock:
                self._sessions.pop(s.id, None)
            raise

    def _claim(self, session_id: str) -> Session | None:
        """This replica's up-to-date copy of a session (None: the store has none).

        A copy held at the latest claim stays as it is, KV and all; otherwise the session is
        claimed and rebuilt from its transcript (its next request computes the KV cold).
        """
        assert self.store is not None
        with self._lock:
            local = self._sessions.get(session_id)
        claim = self.store.claim(session_id, local.epoch if local is not None else None)
        if claim is None or claim.stored is not None:
            if local is not None:
                self._drop(local)
            if claim is None:
                return None
        if claim.stored is None:
            return local
        s = Session.from_stored(claim.stored, self.pool)
        with self._lock:
            self._check_room()
            self._sessions[session_id] = s
        return s

    def _drop(self, s: Session) -> None:
        """Forget this replica's copy of a session it no longer holds; the transcript stays."""
        with self._lock:
            if self._sessions.get(s.id) is s:
                del self._sessions[s.id]
            s.deleted = True  # for this replica: no idle-time work is scheduled on it any more
        self._forget(s)

    def delete(self, session_id: str, owner: str | None) -> Session:
        s = self.get(session_id, owner)
        with self._lock:
            if s.busy:
                raise SessionBusy(f"session {session_id!r} has a request in flight")
            # First: a delete that cannot be stored changes nothing. With a shared store only
            # the latest claim may delete; a stale one lets go of its copy instead.
            gone = self.store is None or self.store.delete(s.id, s.epoch if self.shared else None) or not self.shared
            if gone:
                self._sessions.pop(session_id, None)
                s.deleted = True
        if not gone:
            self._drop(s)
            raise SessionMoved(f"session {session_id!r} moved to another replica; retry the request")
        self._forget(s)
        return s

    def _forget(self, s: Session) -> None:
        self.scheduler.cancel_background(s.id)
        if self.spill is not None:
            self.spill.drop(s.id)
        self.book.drop_ready(s)
        s.kv.release()
        with s.data.lock:
            s.queries.clear()
        s.events.close()

    def reap(self, now: float | None = None) -> list[str]:
        """Delete sessions idle for longer than the expiry; every request restarts the clock."""
        now = time.time() if now is None else now
        limit = self.limits.idle_expiry_s
        with self._lock:
            expired = [s for s in self._sessions.values() if not s.busy and now - s.last_used > limit]
            for s in expired:
                self._sessions.pop(s.id, None)
                s.deleted = True
        for s in expired:
            if self.store is not None:
                try:
                    # A shared store refuses a stale claim's delete: then only this copy goes.
                    self.store.delete(s.id, s.epoch if self.shared else None)
                except StoreUnavailable:  # it stays stored, and expires again after a restart
                    log.warning("could not delete expired session %s from the store", s.id, exc_info=True)
            self._forget(s)
        self.evictions.expired += len(expired)
        return [s.id for s in expired]

    # -- memory ------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        return self.budget.resident()

    @property
    def peak_resident(self) -> int:
        """The most KV ever held at once, checked against the budget."""
        return self.budget.peak()

    def admit(self, s: Session, reserve_tokens: int) -> bool:
        """Reserve room for a request on ``s`` before it starts; False: it must wait.

        Called within a step by the scheduler. The reservation is the blocks the
        request may grow to, less those the session holds already. Room comes from
        evicting sessions no request is computing; a queued request's session may lose
        its KV here (its request then recomputes, or reloads it from the spill folder).
        """
        # One more block when a block of the session is shared: writing into it copies it.
        cow = any(self.pool.refs[b] > 1 for b in s.kv.blocks)
        need = max(0, self.pool.blocks_for(reserve_tokens) + cow - self.budget.held_blocks(s))
        short = need - self.pool.available()
        # The sessions are listed only when the pool is short: a request's admission stays O(1).
        plan = self.budget.plan(self._holding_kv(), short, s, background=False) if short > 0 else []
        if plan is None:
            return False
        for ev in plan:
            self.evict(ev)
        s.reserved = self.pool.reserve(need)
        return True

    def make_room(self, keep: Session, need: int, background: bool, stepping: Collection[Session] = ()) -> bool:
        """Evict until ``need`` more blocks fit; background work gets room only from other
        sessions' ready positions, and nothing in ``stepping`` (the sessions the step being
        planned computes on) is evicted. Runs on the model thread, only when the pool is short."""
        sessions = [s for s in self._holding_kv() if s not in stepping]
        room = self.pool.available()
        if not background and keep.reserved is not None:
            room += keep.reserved.left
        plan = self.budget.plan(sessions, need - room, keep, background)
        if plan is None:
            if background:
                return False
            # Within its reservation a request always fits; past it (it cannot be) clear all.
            plan = list(self.budget.candidates(sessions, keep, background))
        for ev in plan:
            self.evict(ev)
        return True

    def evict(self, ev: Eviction) -> None:
        s = ev.session
        self.book.drop_ready(s)
        if ev.kind == "ready":
            self.evictions.ready += 1
            return
        self.scheduler.cancel_background(s.id)
        if self.spill is not None and s.kv_ids:
            self.spill.save(s.id, s.kv)
            self.evictions.spilled += 1
        self.book.reset(s)
        s.evicted = True
        self.evictions.kv += 1

    def reload(self, s: Session) -> int:
        """Bring back a spilled KV before a request computes anything; tokens reloaded."""
        if s.kv_ids or self.spill is None:
            return 0
        spilled = self.spill.take(s.id)
        if spilled is None:
            return 0
        ids, rows = spilled
        need = s.kv.blocks_needed(len(ids))
        room = self.pool.available() + (s.reserved.left if s.reserved is not None else 0)
        if need > room:
            self.make_room(s, need, background=False)
        s.kv.append(ids, s.reserved)
        self.pool.write(s.kv.blocks, rows)
        s.kv_background = bytearray(len(ids))
        self.evictions.reloaded += 1
        return len(ids)
