"""Streaming data: entries pushed to a session and brought into its context in the background.

A client pushes text entries at any rate; they wait in a bounded queue (when it is full the
oldest waiting entries are dropped and counted, so a slow model never makes a producer
block or the server grow without bound). The session's upkeep job (upkeep.py) takes the
waiting entries as one *batch*, renders them as one user message after the session's
messages, and prefills up to the entry of the next message. Only when that prefill is done
is the batch committed: the message joins the session, ``data_version`` goes up, and the
entries count as ingested. A batch interrupted by a foreground request stays in flight and
is taken up again afterwards, so entries are ingested exactly once and in order.

Everything still goes through the engine's one rule: render in full, compare ids, keep the
longest common prefix. A sliding ``window`` (and, always, the model's context) is kept by
dropping the oldest messages other than the system prompt; the KV is then recomputed from
the first dropped message, which costs a re-prefill but never changes an answer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from headstart.session.template import ChatTemplate, Message

if TYPE_CHECKING:
    import torch

    from headstart.session.book import KVBook, Need
    from headstart.session.session import Session

DATA_ROLE = "user"


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


def window_limit(context_length: int, reserve: int, window: int | None) -> int:
    """Tokens a session's context may hold: its window, and always room for a question."""
    room = context_length - reserve
    return room if window is None else min(window, room)


def fit_window(
    template: ChatTemplate, messages: list[Message], tools: list | None, limit: int
) -> tuple[list[Message], int]:
    """``messages`` with the oldest non-system ones dropped until the context fits ``limit``.

    Once over the limit it drops down to three quarters of it, so the re-prefill a slide
    costs is paid once per quarter window of new data, not on every batch. The last
    message (the new batch) is always kept. Returns the messages and how many were dropped.
    """
    def size(msgs: list[Message]) -> int:
        return len(template.entry(msgs, DATA_ROLE, tools=tools))

    if size(messages) <= limit:
        return messages, 0
    head = 1 if messages and messages[0].get("role") == "system" else 0

    def drop(k: int) -> list[Message]:
        return messages[:head] + messages[head + k :]

    droppable = len(messages) - head - 1
    target = limit * 3 // 4
    if droppable <= 0 or size(drop(droppable)) > target:
        return drop(max(droppable, 0)), max(droppable, 0)
    lo, hi = 1, droppable  # the fewest drops that reach the target (size falls as k grows)
    while lo < hi:
        mid = (lo + hi) // 2
        if size(drop(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    return drop(lo), lo


def ingest_batch(
    book: KVBook, template: ChatTemplate, s: Session, limit: int, chunk: int
) -> Generator[Need | None, torch.Tensor | None, int]:
    """Bring the next batch into ``s``'s context; returns how many entries were ingested."""
    batch = s.data.take(limit // 2)
    if not batch:
        return 0
    content = "\n".join(e.text for e in batch)
    messages, dropped = fit_window(template, [*s.messages, {"role": DATA_ROLE, "content": content}], s.tools, limit)
    entry = template.entry(messages, DATA_ROLE, tools=s.tools, cache=s.renders)
    if len(entry) > limit:
        # Cannot happen for entries the door accepted (each is at most half the window);
        # refuse the batch rather than overflow the model's context.
        s.data.abandon()
        return 0
    yield from book.advance(s, entry, background=True, chunk=chunk)
    s.entry_len = len(entry)
    s.messages = messages
    with s.data.lock:
        s.data.trimmed_messages += dropped
    s.data.commit()
    # The parked prediction of the next message was made before this data: a request now
    # follows the data, so that position predicts nothing (pre-positioning makes a new one).
    stale = s.ready.pop("next", None)
    if stale is not None:
        book.discard(stale)
    return len(batch)
