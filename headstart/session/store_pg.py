"""Transcripts in PostgreSQL, for replicas on several machines that share sessions.

The same interface, SQL, columns and schema versions as the SQLite store (store.py); each
transaction takes a connection from a small pool (psycopg 3). A claim locks the session's
row (``FOR UPDATE``) so two replicas claiming at once get distinct epochs, and a fenced
write is one ``UPDATE ... WHERE holder AND epoch``: under READ COMMITTED a write racing a
claim re-checks the row after the claim commits and is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from headstart.errors import StoreUnavailable
from headstart.session.store import SCHEMA_VERSION, Execute, FencedSQL, SchemaError, migrations

# The columns of store.TABLE in PostgreSQL's types.
PG_TYPES = {"text": "TEXT", "json": "TEXT", "real": "DOUBLE PRECISION", "int": "INTEGER", "bigint": "BIGINT"}
_MIGRATIONS = migrations(PG_TYPES)


class PostgresStore(FencedSQL):
    """Sessions in one PostgreSQL database, through a pool of connections."""

    _lock_row = " FOR UPDATE"

    def __init__(self, url: str, holder: str | None = None, pool_size: int = 4) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        self.holder = holder
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, name="headstart-store")
        self._pool.open(wait=True, timeout=30)
        self._migrate()

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            # One migrating replica at a time; the others wait, then find the work done.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('headstart-schema'))")
            conn.execute("CREATE TABLE IF NOT EXISTS headstart_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM headstart_schema").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"the database has schema version {version}; this headstart knows up to {SCHEMA_VERSION}"
                )
            for step in _MIGRATIONS[version:]:
                for statement in step:
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO headstart_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                conn.execute("UPDATE headstart_schema SET version = %s", (SCHEMA_VERSION,))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Execute]:
        """One transaction on a pooled connection; a server that cannot be reached or cannot
        commit is a :class:`StoreUnavailable`: nothing is acknowledged."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn, conn.transaction():

                def run(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
                    cur = conn.execute(sql.replace("?", "%s"), params)
                    return cur.fetchall() if cur.description is not None else []

                yield run
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailable(f"the session store could not be written ({exc}); nothing was saved, "
                                   "retry once the database is reachable again") from exc

    def close(self) -> None:
        self._pool.close()
