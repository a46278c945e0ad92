"""The stream of one request's output, from the step loop to a door.

The thread holding the step (the model thread, or a door that started the request:
loop.py) puts text deltas and then a final completion (or an error); a door reads them
with a plain iterator or, when it submitted from an event loop, with ``async for``.
Cancelling tells the loop to stop the request at its next step.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headstart.decode.logits import TokenLogprob
    from headstart.session.tools import ToolCall


@dataclass
class Delta:
    """Newly final text and the token ids it came from (with their log-probabilities when
    the request asked: those of tokens whose text was held back ride on a later delta)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """Everything a door reports about a finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str
    path: str
    session_id: str | None
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float
    decided_ms: float
    e2e_ms: float
    foreground_wait_ms: float  # arrival to the request's first step: door_ms + queue_ms
    # The time the request's computation waited in steps that carried idle-time work instead:
    # 0 by the step loop's order (background only takes budget no request wants), and measured.
    background_wait_ms: float = 0.0
    door_ms: float = 0.0  # arrival to queued: parsing, checks, rendering, tokenising, tool planning
    queue_ms: float = 0.0  # queued to the request's first step
    logit_gap: float | None = None
    speculative: bool = False
    verified: bool | None = None
    candidate: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[ToolCall] | None = None  # the answer read as calls (finish_reason "tool_calls")
    logprobs: list[TokenLogprob] | None = None  # one per chosen token, when the request asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


_END = object()


class Handle:
    """One request's output queue, readable from a thread or an event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, arrival: float | None = None) -> None:
        self.arrival = time.perf_counter() if arrival is None else arrival  # the door's receipt of the request
        self.cancelled = False
        self.completion: Completion | None = None
        self.choices: list[Handle] = [self]  # every choice's handle, when a request asks for n > 1
        self._loop = loop
        # Only the queue its reader uses (one is made on every request's critical path; the
        # C SimpleQueue costs a fraction of queue.Queue's three conditions).
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue[Any] | None = queue.SimpleQueue() if loop is None else None

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, item: Delta | Completion | BaseException) -> None:
        """Called by the thread that holds the step (the model thread, or a door: loop.py)."""
        if isinstance(item, Completion):
            self.completion = item
        if self._sync is not None:
            self._sync.put(item)
            return
        assert self._loop is not None and self._async is not None
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancelled = True

    def __iter__(self) -> Iterator[Delta | Completion]:
        assert self._sync is not None, "submit without a loop to read from a thread"
        while True:
            item = self._sync.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Completion):
                return

    async def __aiter__(self) -> AsyncIterator[Delta | Completion]:
        assert self._async is not None, "submit with a loop to read asynchronously"
        while True:
            item = await self._async.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Completion):
                return

    def result(self) -> Completion:
        """Block until the completion (sync handles only)."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion
