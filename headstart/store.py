"""Transcripts that survive a restart: sessions in SQLite.

A session's id, owner, settings, messages and counters are written before the client is
told anything about them, so a crash (even ``kill -9``) loses no acknowledged turn. KV is
not stored here: it is a cache, rebuilt (or reloaded from the spill folder) on demand.
WAL mode keeps reads cheap while the single writer commits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.errors import StoreUnavailable
from headstart.ownership import Claim

# One statement per schema version: _MIGRATIONS[v] brings a database from version v to v+1.
_MIGRATIONS = [
    """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    settings TEXT NOT NULL DEFAULT '{}',
    messages TEXT NOT NULL DEFAULT '[]',
    tools TEXT,
    paths TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT '{}'
)
""",
]
SCHEMA_VERSION = len(_MIGRATIONS)


def default_data_dir() -> Path:
    """``$HEADSTART_DATA``, else ``~/.local/share/headstart``."""
    env = os.environ.get("HEADSTART_DATA")
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "headstart"


@dataclass
class StoredSession:
    """A session's durable part, as read back at start-up."""

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


class SchemaError(RuntimeError):
    """The database was written by a newer headstart."""


class SessionStore:
    """One SQLite file, one writer connection guarded by a lock, owned by one process at a
    time (a second one gets :class:`~headstart.ownership.Claimed`, naming the holder)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._claim = Claim(self.path.with_name(self.path.name + ".lock"), f"the database {self.path}")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against a process crash in WAL mode; FULL would add an fsync
            # per turn to survive power loss too. A process crash is what we promise.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
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
                    self._db.execute(step)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._claim.release()

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        """Commit one statement; a failed commit (disk full, read-only, I/O error) is a
        :class:`StoreUnavailable`, so the caller refuses what it could not make durable."""
        with self._lock:
            try:
                self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"the session store could not be written ({exc}); nothing was saved, "
                                       "retry once the disk accepts writes again") from exc

    def save(self, s: StoredSession) -> None:
        """Insert or replace a session's durable part in one transaction."""
        row = (
            s.id,
            s.owner,
            s.created,
            s.last_used,
            s.turns,
            json.dumps(s.settings),
            json.dumps(s.messages),
            json.dumps(s.tools) if s.tools is not None else None,
            json.dumps(s.paths),
            json.dumps(s.state),
        )
        self._write(
            "INSERT OR REPLACE INTO sessions "
            "(id, owner, created, last_used, turns, settings, messages, tools, paths, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    def touch(self, session_id: str, last_used: float) -> None:
        self._write("UPDATE sessions SET last_used = ? WHERE id = ?", (last_used, session_id))

    def delete(self, session_id: str) -> None:
        self._write("DELETE FROM sessions WHERE id = ?", (session_id,))

    def load_all(self) -> list[StoredSession]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, owner, created, last_used, turns, settings, messages, tools, paths, state "
                "FROM sessions ORDER BY last_used"
            ).fetchall()
        return [
            StoredSession(
                id=r[0],
                owner=r[1],
                created=r[2],
                last_used=r[3],
                turns=r[4],
                settings=json.loads(r[5]),
                messages=json.loads(r[6]),
                tools=json.loads(r[7]) if r[7] is not None else None,
                paths=json.loads(r[8]),
                state=json.loads(r[9]),
            )
            for r in rows
        ]
