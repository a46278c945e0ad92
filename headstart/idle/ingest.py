"""Streaming data: entries pushed to a session and brought into its context in the background.

A client pushes text entries at any rate; they wait in a bounded queue (when it is full the
oldest waiting entries are dropped and counted, so a slow model never makes a producer
block or the server grow without bound). The session's idle-time job (job.py) takes the
waiting entries as one *batch*, renders them as one user message after the session's
messages, and prefills up to the entry of the next message. Only when that prefill is done
is the batch committed: the message joins the session, ``data_version`` goes up, and the
entries count as ingested. A batch interrupted by a foreground request, or by a failure (a
forward or the tokenizer raising: job.py's ``_failed``), stays in flight and is taken up
again afterwards, so acknowledged entries are ingested exactly once and in order.

Everything still goes through the engine's one rule: render in full, compare ids, keep the
longest common prefix. A sliding ``window`` (and, always, the model's context) is kept by
dropping the oldest messages other than the system prompt; the KV is then recomputed from
the first dropped message, which costs a re-prefill but never changes an answer.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from headstart.session.template import ChatTemplate, Message

if TYPE_CHECKING:
    import torch

    from headstart.session.book import KVBook, Need
    from headstart.session.session import Session

DATA_ROLE = "user"


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
