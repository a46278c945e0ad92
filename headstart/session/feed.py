"""A session's data queue: entries pushed at any rate, waiting in a bounded queue until the
idle-time job (idle/ingest.py) brings them into the context. Data, kept with the session (a
session owns its feed and stores it); the job that ingests it builds on this module."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One pushed text and its token count (measured once, when pushed)."""

    text: str
    tokens: int


@dataclass(frozen=True)
class PushResult:
    pushed: int
    dropped: int
    pending: int
    data_version: int


class DataFeed:
    """A session's data queue and counters; safe to use from the door and the model thread."""

    def __init__(self, max_pending: int, window: int | None = None) -> None:
        # Re-entrant: a push holds it while the session is stored, which snapshots the feed.
        self.lock = threading.RLock()
        self.max_pending = max_pending
        self.window = window
        self.pending: deque[Entry] = deque()
        self.inflight: list[Entry] = []
        self.version = 0
        self.pushed = 0
        self.ingested = 0
        self.dropped = 0
        self.trimmed_messages = 0
        self.failures = 0  # failed attempts at the batch in flight (a push was acknowledged: never dropped)

    def push(self, entries: list[Entry]) -> PushResult:
        """Queue ``entries``; drop the oldest waiting ones past ``max_pending`` (the batch in
        flight counts too: it is pending until ingested, and is never dropped)."""
        with self.lock:
            self.pending.extend(entries)
            over = min(len(self.pending), max(0, len(self.pending) + len(self.inflight) - self.max_pending))
            for _ in range(over):
                self.pending.popleft()
            self.pushed += len(entries)
            self.dropped += over
            return PushResult(len(entries), over, len(self.pending) + len(self.inflight), self.version)

    def mark(self) -> tuple[list[Entry], int, int]:
        """What :meth:`rollback` puts back: the waiting entries and the push counters."""
        with self.lock:
            return list(self.pending), self.pushed, self.dropped

    def rollback(self, mark: tuple[list[Entry], int, int]) -> None:
        """Undo the pushes since ``mark`` (they could not be stored); call with the lock held
        since the mark, so the batch in flight has not moved."""
        with self.lock:
            pending, self.pushed, self.dropped = mark
            self.pending = deque(pending)

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.pending or self.inflight)

    @property
    def waiting(self) -> int:
        """Entries pushed but not yet KV-resident (queued or in flight)."""
        with self.lock:
            return len(self.pending) + len(self.inflight)

    def take(self, budget: int) -> list[Entry]:
        """The batch to ingest: the one in flight, else waiting entries up to ``budget``
        tokens (always at least one)."""
        with self.lock:
            if not self.inflight:
                used = 0
                while self.pending and (not self.inflight or used + self.pending[0].tokens <= budget):
                    entry = self.pending.popleft()
                    used += entry.tokens + 1
                    self.inflight.append(entry)
            return list(self.inflight)

    def commit(self) -> int:
        """The batch in flight is KV-resident: count it and bump the version."""
        with self.lock:
            self.ingested += len(self.inflight)
            self.inflight = []
            self.failures = 0
            self.version += 1
            return self.version

    def abandon(self) -> int:
        """Drop the batch in flight (it could not be ingested); returns how many."""
        with self.lock:
            n = len(self.inflight)
            self.dropped += n
            self.inflight = []
            return n

    def snapshot(self) -> dict[str, Any]:
        """The feed as stored: entries not yet ingested (the batch in flight first) and counters."""
        with self.lock:
            return {
                "max_pending": self.max_pending,
                "window": self.window,
                "entries": [[e.text, e.tokens] for e in [*self.inflight, *self.pending]],
                "version": self.version,
                "pushed": self.pushed,
                "ingested": self.ingested,
                "dropped": self.dropped,
                "trimmed_messages": self.trimmed_messages,
            }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> DataFeed:
        feed = cls(data["max_pending"], data.get("window"))
        feed.pending.extend(Entry(text, tokens) for text, tokens in data["entries"])
        feed.version, feed.pushed = data["version"], data["pushed"]
        feed.ingested, feed.dropped = data["ingested"], data["dropped"]
        feed.trimmed_messages = data.get("trimmed_messages", 0)
        return feed

    def counters(self) -> dict[str, int]:
        with self.lock:
            return {
                "data_version": self.version,
                "pending": len(self.pending) + len(self.inflight),
                "pushed": self.pushed,
                "ingested": self.ingested,
                "dropped": self.dropped,
                "max_pending": self.max_pending,
            }
