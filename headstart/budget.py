"""The KV memory budget: what to evict, in which order, to make room.

Resident KV is every session's own rows plus its parked ready positions. Over budget,
the least recently used go first: ready positions (speculation, cheap to redo) before
session KV (real state), idle sessions before busy ones, and never a session with a
request in flight. Background work may only push out other ready positions: idle-time
speculation must never evict a session's real state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from headstart.session import Session


def default_budget(device: str) -> int:
    """A quarter of the machine's memory on CPU, 40% of the free GPU memory on CUDA."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.4)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages // 4


@dataclass(frozen=True)
class Eviction:
    """One thing to drop: a session's ready positions, or its whole KV."""

    session: Session
    kind: str  # "ready" or "kv"
    frees: int


@dataclass
class Budget:
    limit: int
    bytes_per_token: int

    def session_bytes(self, s: Session) -> int:
        return len(s.kv_ids) * self.bytes_per_token + s.ready_bytes()

    def resident(self, sessions: Iterable[Session]) -> int:
        return sum(self.session_bytes(s) for s in sessions)

    def plan(self, sessions: list[Session], need: int, keep: Session, background: bool) -> list[Eviction] | None:
        """Evictions that make ``need`` more bytes fit, or None if they cannot be found."""
        over = self.resident(sessions) + need - self.limit
        if over <= 0:
            return []
        plan: list[Eviction] = []
        for ev in self.candidates(sessions, keep, background):
            plan.append(ev)
            over -= ev.frees
            if over <= 0:
                return plan
        return None

    def candidates(self, sessions: list[Session], keep: Session, background: bool) -> Iterator[Eviction]:
        """Everything that may be evicted for ``keep``, in eviction order."""
        others = sorted((s for s in sessions if s is not keep), key=lambda s: s.last_used)
        for s in others:
            if s.ready:
                yield Eviction(s, "ready", s.ready_bytes())
        if background:
            return
        for s in others:
            if not s.busy and s.kv_ids:
                yield Eviction(s, "kv", len(s.kv_ids) * self.bytes_per_token)
