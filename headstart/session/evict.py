"""The KV memory budget: what to evict, in which order, to make room.

The budget is the block pool's count of blocks that may be in use (``--kv-budget`` over
the block size); resident KV is the blocks in use plus the blocks' worth that ready
positions' logits take. While the pool has room, checking costs O(1); only a shortage
plans evictions. Over budget, the least recently used go first: ready positions
(speculation, cheap to redo) before session KV (real state), and never a session whose
request is being computed. Such a session holds a *reservation*, the most its request
can grow to (prompt plus answer plus the sure tail, less what it already holds), taken
when the request is admitted; a request waits in the queue until its reservation fits.
Background work may only push out other ready positions: idle-time speculation never
evicts a session's real state and never takes room reserved for a request.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from headstart.kv import BlockPool, KVSeq
from headstart.session.session import Session


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
    frees: int = 0  # bytes it frees at most (shared blocks stay while another holder keeps them)


def _seqs(ev: Eviction) -> list[KVSeq]:
    """The sequences an eviction drops (every ready eviction comes before any KV one)."""
    s = ev.session
    if ev.kind == "kv":
        return [s.kv]
    return [rp.seq for rp in list(s.ready.values()) if rp.seq is not None]


class Budget:
    """The pool's block count seen as bytes, and the eviction planner."""

    def __init__(self, pool: BlockPool, bytes_per_token: int) -> None:
        self.pool = pool
        self.bytes_per_token = bytes_per_token

    @property
    def limit(self) -> int:
        """The budget in bytes (a whole number of blocks)."""
        return self.pool.limit * self.pool.block_bytes

    @limit.setter
    def limit(self, nbytes: int) -> None:
        self.pool.limit = nbytes // self.pool.block_bytes

    def resident(self) -> int:
        """Bytes actually held (what the budget promises to bound)."""
        return self.pool.resident_bytes()

    def peak(self) -> int:
        return self.pool.peak

    def held_blocks(self, s: Session) -> int:
        """Blocks ``s`` holds: its own sequence's and what its ready positions add."""
        return len(s.kv.blocks) + s.ready_bytes() // self.pool.block_bytes

    def plan(self, sessions: list[Session], short: int, keep: Session, background: bool) -> list[Eviction] | None:
        """Evictions that free at least ``short`` blocks for ``keep``, or None if there are none.

        Blocks shared between sequences are freed only when every holder goes, so the plan
        counts each block once its last reference is in the plan.
        """
        if short <= 0:
            return []
        refs = self.pool.refs
        dropped: Counter[int] = Counter()
        plan: list[Eviction] = []
        for ev in self.candidates(sessions, keep, background):
            plan.append(ev)
            for seq in _seqs(ev):
                for b in seq.blocks:
                    dropped[b] += 1
                    if dropped[b] == refs[b]:
                        short -= 1
            if ev.kind == "ready":  # logits' bytes, as whole blocks (the count rounds them up)
                short -= sum(rp.charge for rp in list(ev.session.ready.values())) // self.pool.block_bytes
            if short <= 0:
                return plan
        return None

    def candidates(self, sessions: list[Session], keep: Session, background: bool) -> Iterator[Eviction]:
        """Everything that may be evicted for ``keep``, in eviction order."""
        others = sorted((s for s in sessions if s is not keep and s.reserved is None), key=lambda s: s.last_used)
        for s in others:
            if s.ready:
                yield Eviction(s, "ready", s.ready_bytes())
        if background:
            return
        for s in others:
            if s.kv_ids:
                yield Eviction(s, "kv", s.kv.nbytes())
