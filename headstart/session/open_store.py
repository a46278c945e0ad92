"""The store a ``--db`` value names: SQLite for a path, PostgreSQL for a ``postgresql://`` URL.

Apart from store.py, which store_pg.py builds on, so neither imports the other back."""

from __future__ import annotations

from headstart.session.store import SessionStore, TranscriptStore
from headstart.session.store_pg import PostgresStore


def open_store(url: str, holder: str | None = None) -> TranscriptStore:
    """``postgresql://...`` opens PostgreSQL; anything else is a SQLite file path."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url, holder)
    return SessionStore(url, holder)
