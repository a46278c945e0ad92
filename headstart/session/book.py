"""Bookkeeping for a session's KV: every change keeps ids, KV and accounting in step.

All model calls of the engine go through here, so the session's ``kv_ids`` is always
exactly what its KV holds, and background tokens are counted once as computed and then
once as either reused by a request or wasted. Ready positions are forks of the session's
sequence: parking, restoring and dropping one moves block references, never KV rows.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch

from headstart.model.backend import Backend
from headstart.model.hf_runner import HFRunner
from headstart.model.runner import Feed, Runner
from headstart.session.session import ReadyPosition, Session
from headstart.session.template import common_prefix
from headstart.stats import EngineStats


class NoRoom(Exception):
    """Background work found no room in the KV budget without evicting real state."""


RoomMaker = Callable[[Session, int, bool], bool]


class KVBook:
    """KV operations on sessions, with token accounting."""

    def __init__(self, backend: Backend, runner: Runner | HFRunner, stats: EngineStats) -> None:
        self.backend = backend
        self.runner = runner
        self.pool = runner.pool
        self.stats = stats
        self.make_room: RoomMaker | None = None  # set by the registry that owns the budget

    def crop(self, s: Session, length: int, *, wasted: bool = True) -> None:
        """Shorten ``s``'s KV; background rows dropped unused count as wasted."""
        if length >= len(s.kv_ids):
            return
        if wasted:
            dropped = sum(s.kv_background[length:])
            with self.stats.lock:
                self.stats.background.wasted += dropped
        s.kv.crop(length)
        del s.kv_background[length:]
        if s.entry_len is not None and s.entry_len > length:
            s.entry_len = None

    def reset(self, s: Session) -> None:
        """Drop ``s``'s whole KV (eviction, failure); its transcript stays."""
        with self.stats.lock:
            self.stats.background.wasted += sum(s.kv_background)
        s.kv.release()
        s.kv_background.clear()
        s.entry_len = None

    def feed(self, s: Session, ids: list[int], *, background: bool, keep: int = 1) -> torch.Tensor:
        """Run ``ids`` over ``s``'s KV; the logits of the last ``keep`` positions."""
        need = s.kv.blocks_needed(len(ids))
        reservation = None if background else s.reserved
        room = self.pool.available() + (reservation.left if reservation is not None else 0)
        # O(1) while the budget has room; only a shortage walks the sessions.
        if need > room and self.make_room is not None and not self.make_room(s, need, background):
            raise NoRoom
        logits = self.runner.forward([Feed(s.kv, ids, keep, reservation)])[0]
        s.kv_background.extend([background] * len(ids))
        with self.stats.lock:
            self.stats.forward_calls += 1
            if background:
                self.stats.background.computed += len(ids)
        return logits

    def take(self, s: Session, upto: int) -> int:
        """A request uses the first ``upto`` rows: background rows among them are reused."""
        reused = sum(s.kv_background[:upto])
        if reused:
            s.kv_background[:upto] = [False] * upto
            with self.stats.lock:
                self.stats.background.reused += reused
        return reused

    def advance(
        self, s: Session, ids: list[int], *, background: bool, chunk: int
    ) -> Generator[None, None, torch.Tensor]:
        """Bring ``s``'s KV to ``ids`` reusing the longest common prefix; return the last
        position's logits. Background work yields every ``chunk`` tokens."""
        lcp = common_prefix(ids, s.kv_ids)
        if lcp == len(ids):
            lcp -= 1  # the logits of the last position are not kept: recompute it
        self.crop(s, lcp)
        if not background:
            self.take(s, lcp)
        logits = None
        pos = lcp
        while pos < len(ids):
            step = ids[pos : pos + chunk] if background else ids[pos:]
            logits = self.feed(s, step, background=background)[-1]
            pos += len(step)
            if background and pos < len(ids):
                yield
        assert logits is not None
        return logits

    def park(self, s: Session, rp: ReadyPosition) -> None:
        """Keep ``s``'s KV as the ready position ``rp`` (a fork) and crop the session back
        to ``rp.base``: the rows past it are now held by the position alone."""
        old = s.ready.pop(rp.key, None)
        if old is not None:
            self.discard(old)
        charge = -(-rp.logits_bytes() // self.pool.block_bytes)  # at most this many more blocks taken
        if charge > self.pool.available() and (self.make_room is None or not self.make_room(s, charge, True)):
            raise NoRoom
        rp.seq = s.kv.fork()
        rp.charge = self.pool.charge(rp.logits_bytes())
        s.ready[rp.key] = rp
        rp.background = s.kv_background[rp.base :]
        s.kv.crop(rp.base)
        del s.kv_background[rp.base :]

    def valid(self, s: Session, rp: ReadyPosition) -> bool:
        """Whether ``rp``'s base is still what the session's KV holds."""
        return len(s.kv_ids) >= rp.base and s.kv_ids[: rp.base] == rp.ids[: rp.base]

    def restore(self, s: Session, rp: ReadyPosition, *, keep: bool) -> None:
        """Make ``rp``'s sequence the session's KV (a ready_exact hit): the session adopts
        it, or a fork of it when the position is kept (an ephemeral question). No row is
        copied; its forced answer tokens count as reused only once a request emits them."""
        assert rp.seq is not None
        self.crop(s, rp.base)
        self.take(s, rp.base)
        background = s.kv_background[: rp.base] + rp.background
        if keep:
            s.kv.adopt(rp.seq.fork())
        else:
            s.kv.adopt(rp.seq)
            self.pool.uncharge(rp.charge)
            rp.charge = 0
        s.kv_background[:] = background
        self.take(s, len(rp.ids))

    def discard(self, rp: ReadyPosition) -> None:
        """Forget a ready position: its blocks go back, the idle work in its rows was wasted."""
        with self.stats.lock:
            self.stats.background.wasted += sum(rp.background)
        if rp.seq is not None:
            rp.seq.release()
        self.pool.uncharge(rp.charge)
        rp.charge = 0
        rp.background = []
