"""The KV memory budget: what to evict, in which order, to make room.

Resident KV is every session's own rows plus its parked ready positions. Over budget,
the least recently used go first: ready positions (speculation, cheap to redo) before
session KV (real state), and never a session whose request is being computed. Such a
session holds a *reservation*, the most its request can grow to (prompt plus answer),
taken when the request is admitted; a request waits in the queue until its reservation
fits, so the budget holds however many requests are in flight. Background work may only
push out other ready positions: idle-time speculation never evicts a session's real
state and never takes room reserved for a request.
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

    def actual_bytes(self, s: Session) -> int:
        return len(s.kv_ids) * self.bytes_per_token + s.ready_bytes()

    def session_bytes(self, s: Session, extra: int = 0) -> int:
        """What ``s`` counts against the budget: its bytes (plus ``extra`` about to be
        added), or its reservation while its request runs, whichever is larger."""
        return max(self.actual_bytes(s) + extra, s.reserved)

    def resident(self, sessions: Iterable[Session]) -> int:
        """Bytes actually held (what the budget promises to bound)."""
        return sum(self.actual_bytes(s) for s in sessions)

    def plan(
        self, sessions: list[Session], need: int, keep: Session, background: bool, reserve: int = 0
    ) -> list[Eviction] | None:
        """Evictions after which ``keep`` may add ``need`` bytes (or, with ``reserve``, hold a
        reservation of that many), or None if there are none."""
        counted = sum(self.session_bytes(s) for s in sessions if s is not keep)
        over = counted + max(self.session_bytes(keep, need), reserve) - self.limit
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
        others = sorted((s for s in sessions if s is not keep and not s.reserved), key=lambda s: s.last_used)
        for s in others:
            if s.ready:
                yield Eviction(s, "ready", s.ready_bytes())
        if background:
            return
        for s in others:
            if s.kv_ids:
                yield Eviction(s, "kv", len(s.kv_ids) * self.bytes_per_token)
