"""The store interface on both backends (SQLite and a real PostgreSQL server): schema
versions, fenced claims, and two replica engines sharing one store."""

from __future__ import annotations

import threading
import time

import pytest

from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.errors import SessionMoved
from headstart.model import HFBackend
from headstart.session.open_store import open_store
from headstart.session.store import SCHEMA_VERSION, SQLITE_TYPES, TABLE, SchemaError, StaleClaim, StoredSession
from headstart.session.store_pg import PG_TYPES
from tests.helpers import GREEDY, QUESTIONS, cold


def _session(sid: str, turns: int = 0, epoch: int = 1) -> StoredSession:
    now = time.time()
    return StoredSession(sid, None, now, now, turns=turns, messages=[{"role": "user", "content": f"t{turns}"}],
                         epoch=epoch)


def _raw(url: str, sql: str) -> list[tuple]:
    """Run SQL on the database behind a store, outside the store."""
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []
    import sqlite3

    with sqlite3.connect(url) as conn:
        return conn.execute(sql).fetchall()


def test_the_schema_is_versioned_and_a_newer_one_is_refused(store_url: str) -> None:
    open_store(store_url).close()
    if store_url.startswith("postgresql://"):
        assert _raw(store_url, "SELECT version FROM headstart_schema") == [(SCHEMA_VERSION,)]
        _raw(store_url, f"UPDATE headstart_schema SET version = {SCHEMA_VERSION + 1}")
    else:
        assert _raw(store_url, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        _raw(store_url, f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError):
        open_store(store_url)


def _columns(url: str) -> list[tuple[str, str, str | None]]:
    """The sessions table as the database holds it: (name, type, default) in column order."""
    if url.startswith("postgresql://"):
        rows = _raw(url, "SELECT column_name, data_type, column_default FROM information_schema.columns "
                         "WHERE table_name = 'sessions' ORDER BY ordinal_position")
        return [(name, kind.upper(), default.removesuffix("::text") if default else None)
                for name, kind, default in rows]
    return [(name, kind, default) for _, name, kind, _, default, _ in _raw(url, "PRAGMA table_info(sessions)")]


def _declared(url: str) -> list[tuple[str, str, str | None]]:
    """The sessions table as store.TABLE declares it, in the backend's types."""
    types = PG_TYPES if url.startswith("postgresql://") else SQLITE_TYPES
    return [(c.name, types[c.kind], c.constraint.partition("DEFAULT ")[2] or None) for c in TABLE]


def test_both_backends_hold_the_columns_the_table_declares(store_url: str) -> None:
    open_store(store_url).close()
    assert _columns(store_url) == _declared(store_url)


def test_a_version_1_database_is_migrated_and_keeps_its_sessions(store_url: str) -> None:
    """A database written before sessions had holders opens, with its rows intact at epoch 0."""
    if store_url.startswith("postgresql://"):
        from headstart.session.store_pg import _MIGRATIONS

        _raw(store_url, _MIGRATIONS[0][0])
        _raw(store_url, "CREATE TABLE headstart_schema (version INTEGER NOT NULL)")
        _raw(store_url, "INSERT INTO headstart_schema VALUES (1)")
    else:
        from headstart.session.store import _MIGRATIONS

        _raw(store_url, _MIGRATIONS[0][0])
        _raw(store_url, "PRAGMA user_version=1")
    _raw(store_url, "INSERT INTO sessions (id, owner, created, last_used, turns, messages) "
                    "VALUES ('old', NULL, 1.0, 2.0, 3, '[{\"role\": \"user\", \"content\": \"hi\"}]')")
    store = open_store(store_url)
    try:
        (old,) = store.load_all()
        assert (old.id, old.turns, old.messages, old.epoch) == ("old", 3, [{"role": "user", "content": "hi"}], 0)
        claimed = open_store(store_url, holder="r1").claim("old", None)
        assert claimed is not None and claimed.epoch == 1 and claimed.stored is not None
        assert claimed.stored.turns == 3
        assert _columns(store_url) == _declared(store_url)  # as if it had been created now
    finally:
        store.close()


def test_a_stale_claim_can_no_longer_write(store_url: str) -> None:
    a, b = open_store(store_url, holder="a"), open_store(store_url, holder="b")
    try:
        assert a.insert(_session("s", turns=1))
        assert not b.insert(_session("s", turns=9))  # one creator wins
        assert a.claim("s", 1) == type(a.claim("s", 1))(1, None)  # still a's: nothing to reload
        taken = b.claim("s", None)
        assert taken is not None and taken.epoch == 2 and taken.stored is not None and taken.stored.turns == 1
        with pytest.raises(StaleClaim):
            a.save(_session("s", turns=2, epoch=1))
        b.save(_session("s", turns=2, epoch=2))
        back = a.claim("s", 1)  # the router sent it back to a: a takes over b's turns
        assert back is not None and back.epoch == 3 and back.stored is not None and back.stored.turns == 2
        with pytest.raises(StaleClaim):
            b.save(_session("s", turns=3, epoch=2))
        assert not b.delete("s", 2)
        assert [s.turns for s in a.load_all()] == [2]
        assert a.delete("s", 3)
        assert a.claim("s", 3) is None
        with pytest.raises(StaleClaim):  # a deleted session is not brought back by a late write
            a.save(_session("s", turns=4, epoch=3))
    finally:
        a.close()
        b.close()


def test_racing_claims_get_distinct_epochs(store_url: str) -> None:
    """Replicas claiming one session at the same moment (the ring changing) never share an epoch."""
    seed = open_store(store_url, holder="seed")
    seed.insert(_session("s"))
    holders = [open_store(store_url, holder=f"r{i}") for i in range(4)]
    epochs: list[int] = []
    start = threading.Barrier(len(holders))

    def claim_many(store) -> None:
        start.wait()
        for _ in range(10):
            c = store.claim("s", None)
            assert c is not None
            epochs.append(c.epoch)

    threads = [threading.Thread(target=claim_many, args=(h,)) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(epochs) == list(range(2, 2 + len(epochs)))
    finally:
        for h in [seed, *holders]:
            h.close()


def _replica(backend: HFBackend, store_url: str, name: str) -> Engine:
    store = open_store(store_url, holder=name)
    return Engine(backend, config=EngineConfig(pre_position=False), store=store).start()


def _ask(engine: Engine, messages: list[dict[str, str]]):
    return engine.generate(Request(messages=list(messages), params=GREEDY, session_id="shared"))


def test_two_replicas_writing_one_session_the_stale_one_is_refused(tiny: HFBackend, store_url: str) -> None:
    one, two = _replica(tiny, store_url, "one"), _replica(tiny, store_url, "two")
    try:
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        first = _ask(one, messages)
        assert first.path == "cold"
        messages.append({"role": "assistant", "content": first.text})
        # Replica one is mid-turn (it holds the session busy) when the ring sends the session to two.
        s = one.sessions.acquire("shared", None, create=True)
        messages.append({"role": "user", "content": QUESTIONS[1]})
        second = _ask(two, messages)
        assert second.path == "cold" and second.token_ids == cold(two, messages).token_ids
        s.turns += 1
        with pytest.raises(SessionMoved):
            one.sessions.persist(s)  # the stale holder's turn is refused ...
        assert "shared" not in {x.id for x in one.sessions.all()}  # ... and it let go of its copy
        (stored,) = open_store(store_url).load_all()
        assert stored.turns == 2 and stored.messages[-1]["content"] == second.text
        # Back on one: it takes the session over from two's transcript, and answers exactly.
        messages.append({"role": "assistant", "content": second.text})
        messages.append({"role": "user", "content": QUESTIONS[2]})
        third = _ask(one, messages)
        assert third.token_ids == cold(one, messages).token_ids
        assert one.get_session("shared").turns == 3
        assert {s.id: s.turns for s in two.list_sessions()} == {"shared": 3}  # two lists it from the store
        with pytest.raises(SessionMoved):
            two.sessions.persist(two.sessions._sessions["shared"])
    finally:
        one.stop()
        two.stop()
