"""Transcripts that survive a restart: the store interface, and sessions in SQLite.

A session's id, owner, settings, messages and counters are written before the client is
told anything about them, so a crash (even ``kill -9``) loses no acknowledged turn. KV is
not stored here: it is a cache, rebuilt (or reloaded from the spill folder) on demand.

Two backends share one interface (``TranscriptStore``) and one schema history: SQLite
(this module, the one-machine default; WAL mode keeps reads cheap while the single writer
commits) and PostgreSQL (store_pg.py, for replicas that share sessions). A store opened
with a ``holder`` (a replica's name) fences every write: a session row carries the holder
that last claimed it and an epoch bumped on each claim, and a write from a holder whose
claim is no longer the latest is refused with ``StaleClaim``. Without a holder (one server)
nothing is fenced.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from headstart.errors import StoreUnavailable
from headstart.session.ownership import Claim as Ownership


@dataclass(frozen=True)
class Column:
    """One column of the sessions table, written once for both backends: each renders
    ``kind`` in its own dialect's type (``json`` is text that holds JSON)."""

    name: str
    kind: str  # "text", "json", "real", "int" or "bigint"
    constraint: str = ""
    version: int = 1  # the schema version that added it


# The sessions table in column order. A column is never removed or changed: a new one comes
# with the next version, and a database written by an older headstart gains it by migration.
TABLE: tuple[Column, ...] = (
    Column("id", "text", "PRIMARY KEY"),
    Column("owner", "text"),
    Column("created", "real", "NOT NULL"),
    Column("last_used", "real", "NOT NULL"),
    Column("turns", "int", "NOT NULL DEFAULT 0"),
    Column("settings", "json", "NOT NULL DEFAULT '{}'"),
    Column("messages", "json", "NOT NULL DEFAULT '[]'"),
    Column("tools", "json"),
    Column("paths", "json", "NOT NULL DEFAULT '{}'"),
    Column("state", "json", "NOT NULL DEFAULT '{}'"),
    Column("holder", "text", version=2),  # fenced stores: the claim's holder and epoch
    Column("epoch", "bigint", "NOT NULL DEFAULT 0", version=2),
)
SCHEMA_VERSION = max(c.version for c in TABLE)
NAMES = tuple(c.name for c in TABLE)
COLUMNS = ", ".join(NAMES)
# What a save writes: the transcript, every column but the id and the claim.
_DATA = tuple(c for c in TABLE if c.name not in ("id", "holder", "epoch"))

SQLITE_TYPES = {"text": "TEXT", "json": "TEXT", "real": "REAL", "int": "INTEGER", "bigint": "INTEGER"}


def migrations(types: dict[str, str]) -> list[tuple[str, ...]]:
    """``[v]``: the statements that bring a database from schema version v to v+1, in the
    dialect whose column types are ``types``: version 1 creates the table, each later one adds
    its columns."""

    def ddl(c: Column) -> str:
        return " ".join(filter(None, (c.name, types[c.kind], c.constraint)))

    first = ",\n    ".join(ddl(c) for c in TABLE if c.version == 1)
    later = [tuple(f"ALTER TABLE sessions ADD COLUMN {ddl(c)}" for c in TABLE if c.version == v)
             for v in range(2, SCHEMA_VERSION + 1)]
    return [(f"CREATE TABLE IF NOT EXISTS sessions (\n    {first}\n)",), *later]


_MIGRATIONS = migrations(SQLITE_TYPES)


def default_data_dir() -> Path:
    """``$HEADSTART_DATA``, else ``~/.local/share/headstart``."""
    env = os.environ.get("HEADSTART_DATA")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "headstart"


@dataclass
class StoredSession:
    """A session's durable part, as read back at start-up or on a claim."""

    id: str
    owner: str | None
    created: float
    last_used: float
    turns: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    paths: dict[str, int] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # the claim this copy was written under (fenced stores only)


@dataclass(frozen=True)
class Claim:
    """A holder's claim on a session: its epoch, and the transcript when it changed hands."""

    epoch: int
    stored: StoredSession | None  # None: the holder already held the session at this epoch


class SchemaError(RuntimeError):
    """The database was written by a newer headstart."""


class StaleClaim(RuntimeError):
    """Another holder claimed the session since this one did (or it was deleted): the write is refused."""


class TranscriptStore(Protocol):
    """What the session registry needs from a durable store."""

    holder: str | None

    def save(self, s: StoredSession) -> None:
        """Write a session (fenced by ``s.epoch`` when the store has a holder)."""

    def insert(self, s: StoredSession) -> bool:
        """Create a session claimed by this holder at ``s.epoch``; False if the id exists."""

    def claim(self, session_id: str, held_epoch: int | None) -> Claim | None:
        """Take a session over (None: no such session); a no-op when already held at ``held_epoch``."""

    def delete(self, session_id: str, epoch: int | None = None) -> bool:
        """Remove a session; with an epoch, only while that claim is the latest."""

    def load_all(self) -> list[StoredSession]: ...

    def close(self) -> None: ...


Execute = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]


def encode(s: StoredSession) -> tuple[Any, ...]:
    """A session's transcript as row values, in ``_DATA`` order."""
    return tuple(_dump(c, getattr(s, c.name)) for c in _DATA)


def as_row(values: Sequence[Any]) -> dict[str, Any]:
    """A row selected as ``COLUMNS``, by column name."""
    return dict(zip(NAMES, values, strict=True))


def decode(row: dict[str, Any]) -> StoredSession:
    """A session from its row (:func:`as_row`); the holder is the store's, not the session's."""
    return StoredSession(**{c.name: _load(c, row[c.name]) for c in TABLE if c.name != "holder"})


def _dump(c: Column, value: Any) -> Any:
    return json.dumps(value) if c.kind == "json" and value is not None else value


def _load(c: Column, value: Any) -> Any:
    return json.loads(value) if c.kind == "json" and value is not None else value


_SET_NAMES = ", ".join(c.name for c in _DATA)
_SET_SLOTS = ", ".join("?" for _ in _DATA)
_UPSERT = ", ".join(f"{c.name} = excluded.{c.name}" for c in _DATA)
_UPDATE = ", ".join(f"{c.name} = ?" for c in _DATA)


class FencedSQL:
    """The SQL both backends run, written once with ``?`` placeholders.

    A backend supplies ``_transaction`` (one transaction, yielding an execute function)
    and ``_lock_row`` (PostgreSQL's ``FOR UPDATE``; SQLite's writer lock already
    serialises the transaction).
    """

    holder: str | None
    _lock_row = ""

    def _transaction(self) -> contextlib.AbstractContextManager[Execute]:
        raise NotImplementedError

    def save(self, s: StoredSession) -> None:
        values = encode(s)
        with self._transaction() as run:
            if self.holder is None:
                run(
                    f"INSERT INTO sessions (id, {_SET_NAMES}, holder, epoch) VALUES (?, {_SET_SLOTS}, NULL, 0) "
                    f"ON CONFLICT(id) DO UPDATE SET {_UPSERT}",
                    (s.id, *values),
                )
                return
            done = run(
                f"UPDATE sessions SET {_UPDATE} WHERE id = ? AND holder = ? AND epoch = ? RETURNING id",
                (*values, s.id, self.holder, s.epoch),
            )
            if not done:
                raise StaleClaim(f"session {s.id!r} was claimed by another replica (or deleted) since epoch {s.epoch}")

    def insert(self, s: StoredSession) -> bool:
        with self._transaction() as run:
            made = run(
                f"INSERT INTO sessions (id, {_SET_NAMES}, holder, epoch) VALUES (?, {_SET_SLOTS}, ?, ?) "
                "ON CONFLICT(id) DO NOTHING RETURNING id",
                (s.id, *encode(s), self.holder, s.epoch),
            )
        return bool(made)

    def claim(self, session_id: str, held_epoch: int | None) -> Claim | None:
        with self._transaction() as run:
            rows = run(f"SELECT {COLUMNS} FROM sessions WHERE id = ?{self._lock_row}", (session_id,))
            if not rows:
                return None
            row = as_row(rows[0])
            if row["holder"] == self.holder and row["epoch"] == held_epoch:
                return Claim(held_epoch, None)
            epoch = row["epoch"] + 1
            run("UPDATE sessions SET holder = ?, epoch = ? WHERE id = ?", (self.holder, epoch, session_id))
        stored = decode(row)
        stored.epoch = epoch
        return Claim(epoch, stored)

    def delete(self, session_id: str, epoch: int | None = None) -> bool:
        with self._transaction() as run:
            if epoch is None:
                gone = run("DELETE FROM sessions WHERE id = ? RETURNING id", (session_id,))
            else:
                gone = run(
                    "DELETE FROM sessions WHERE id = ? AND holder = ? AND epoch = ? RETURNING id",
                    (session_id, self.holder, epoch),
                )
        return bool(gone)

    def load_all(self) -> list[StoredSession]:
        with self._transaction() as run:
            rows = run(f"SELECT {COLUMNS} FROM sessions ORDER BY last_used", ())
        return [decode(as_row(r)) for r in rows]


class SessionStore(FencedSQL):
    """One SQLite file, one writer connection guarded by a lock. Without a holder the file
    is owned by one process at a time (a second one gets
    :class:`~headstart.session.ownership.Claimed`, naming the holder); stores with holders share it,
    each write fenced by its claim."""

    def __init__(self, path: str | os.PathLike[str], holder: str | None = None) -> None:
        self.path = Path(path)
        self.holder = holder
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim = (
            Ownership(self.path.with_name(self.path.name + ".lock"), f"the database {self.path}")
            if holder is None
            else None
        )
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against a process crash in WAL mode; FULL would add an fsync
            # per turn to survive power loss too. A process crash is what we promise.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            if self._claim is not None:
                self._claim.release()
            raise

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"{self.path} has schema version {version}; this headstart knows up to {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                self._db.execute("BEGIN IMMEDIATE")
                for step in _MIGRATIONS[version:]:
                    for statement in step:
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Execute]:
        """One transaction; a failed commit (disk full, read-only, I/O error) is a
        :class:`StoreUnavailable`, so the caller refuses what it could not make durable."""

        def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
            return self._db.execute(sql, params).fetchall()

        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield run
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise StoreUnavailable(f"the session store could not be written ({exc}); nothing was saved, "
                                       "retry once the disk accepts writes again") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._claim is not None:
            self._claim.release()
