"""Bookkeeping for a session's KV: every change keeps ids, KV and accounting in step.

All model work of the engine is asked for here, so the session's ``kv_ids`` is always
exactly what its KV holds, and background tokens are counted once as computed and then
once as either reused by a request or wasted. A job never calls the model: ``feed``
*yields* a :class:`Need` and the step loop (engine/loop.py) computes it, together with every
other job's, in one forward (``run``). Ready positions are forks of the session's
sequence: parking, restoring and dropping one moves block references, never KV rows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass
from typing import Any

import torch

from headstart.decode.sampling import top_gap
from headstart.model.backend import Backend
from headstart.model.hf_runner import HFRunner
from headstart.model.runner import Feed, Runner
from headstart.session.session import ReadyPosition, Session
from headstart.session.template import common_prefix
from headstart.stats import EngineStats


class NoRoom(Exception):
    """Background work found no room in the KV budget without evicting real state."""


# (session to keep, blocks needed, background, sessions the current step uses) -> room made
RoomMaker = Callable[[Session, int, bool, Collection[Session]], bool]


@dataclass
class Need:
    """What a job needs computed: ``ids`` appended to ``session``'s KV, the logits of the
    last ``keep`` rows back. The loop may compute it over several steps (chunked prefill);
    ``done`` counts the ids already written."""

    session: Session
    ids: list[int]
    keep: int = 1
    background: bool = False
    done: int = 0

    @property
    def left(self) -> int:
        return len(self.ids) - self.done


# What a job is: a generator yielding Needs (or None to give way for a step), sent the rows.
Steps = Generator[Need | None, torch.Tensor | None, Any]


class KVBook:
    """KV operations on sessions, with token accounting."""

    def __init__(self, backend: Backend, runner: Runner | HFRunner, stats: EngineStats) -> None:
        self.backend = backend
        self.runner = runner
        self.pool = runner.pool
        self.stats = stats
        self.make_room: RoomMaker | None = None  # set by the registry that owns the budget

    # -- model work ------------------------------------------------------------------

    def feed(self, s: Session, ids: list[int], *, background: bool, keep: int = 1) -> Steps:
        """Have ``ids`` run over ``s``'s KV (``yield from`` it); the logits of the last ``keep``.

        A generator driven by hand rather than by the step loop (a script, a test) gets
        nothing sent back: then this one need is computed alone, by the same ``run``."""
        need = Need(s, list(ids), keep, background)
        rows = yield need
        if rows is None:
            if not self.fits(need, need.left, 0, ()):
                raise NoRoom
            rows = self.run([(need, need.left)])[0]
        return rows

    def fits(self, need: Need, n: int, claimed: int, stepping: Collection[Session]) -> bool:
        """Whether ``n`` more rows of ``need`` fit beside ``claimed`` blocks the step's other
        background pieces take; makes room by eviction when short, never evicting a session
        in ``stepping``. A request draws on its reservation, so it always fits."""
        s = need.session
        blocks = s.kv.blocks_needed(n)
        reservation = None if need.background else s.reserved
        room = self.pool.available() - claimed + (reservation.left if reservation is not None else 0)
        # O(1) while the budget has room; only a shortage walks the sessions.
        return blocks <= room or (
            self.make_room is not None and self.make_room(s, blocks + claimed, need.background, stepping)
        )

    def run(self, pieces: list[tuple[Need, int]]) -> list[torch.Tensor]:
        """ONE forward over the next ``n`` ids of every need; for each, its kept rows once its
        last id ran (a piece that leaves ids for a later step gets one row it ignores)."""
        feeds = []
        for need, n in pieces:
            last = need.done + n == len(need.ids)
            s = need.session
            reservation = None if need.background else s.reserved
            feeds.append(Feed(s.kv, need.ids[need.done : need.done + n], need.keep if last else 1, reservation))
        out = self.runner.forward(feeds)
        background = 0
        for need, n in pieces:
            need.session.kv_background.extend(b"\x01" * n if need.background else bytes(n))
            need.done += n
            background += n if need.background else 0
        with self.stats.lock:
            self.stats.forward_calls += 1
            self.stats.background.computed += background
        return out

    def advance(self, s: Session, ids: list[int], *, background: bool, chunk: int) -> Steps:
        """Bring ``s``'s KV to ``ids`` reusing the longest common prefix; return the last
        position's logits. Background work asks for ``chunk`` tokens at a time, so its job
        can give way between them; a request asks for all at once and the loop chunks it."""
        lcp = common_prefix(ids, s.kv_ids)
        if lcp == len(ids):
            lcp -= 1  # the logits of the last position are not kept: recompute it
        self.crop(s, lcp)
        if not background:
            self.take(s, lcp)
        step = chunk if background else len(ids)
        logits = None
        for pos in range(lcp, len(ids), step):
            logits = (yield from self.feed(s, ids[pos : pos + step], background=background))[-1]
        assert logits is not None
        return logits

    def greedy(
        self, s: Session, logits: torch.Tensor, *, cap: int, stop: Collection[int],
        min_gap: float | None = None, feed_last: bool = True,
    ) -> Generator[Need | None, torch.Tensor | None, tuple[list[int], list[torch.Tensor]]]:
        """The one greedy decode loop of idle-time work: argmax tokens after ``logits`` until a
        token in ``stop``, ``cap`` tokens, or (with ``min_gap``) a gap below it. Returns the
        tokens and the logits before each and after the last fed one (``feed_last=False``
        leaves the last token of a capped answer unfed: its logits are never needed)."""
        tokens: list[int] = []
        seq = [logits]
        while len(tokens) < cap:
            token, gap = top_gap(seq[-1])
            if token in stop or (min_gap is not None and gap < min_gap):
                break
            tokens.append(token)
            if len(tokens) == cap and not feed_last:
                break
            seq.append((yield from self.feed(s, [token], background=True))[-1])
        return tokens, seq

    # -- rows and their accounting -----------------------------------------------------

    def crop(self, s: Session, length: int, *, wasted: bool = True) -> None:
        """Shorten ``s``'s KV; background rows dropped unused count as wasted."""
        if length >= len(s.kv_ids):
            return
        if wasted:
            dropped = s.kv_background.count(1, length)
            with self.stats.lock:
                self.stats.background.wasted += dropped
        s.kv.crop(length)
        del s.kv_background[length:]
        if s.entry_len is not None and s.entry_len > length:
            s.entry_len = None

    def reset(self, s: Session) -> None:
        """Start ``s``'s cache over (eviction, a failure): its whole KV and every ready
        position go; its transcript stays."""
        self.drop_ready(s)
        with self.stats.lock:
            self.stats.background.wasted += s.kv_background.count(1)
        s.kv.release()
        s.kv_background.clear()
        s.entry_len = None

    def take(self, s: Session, upto: int) -> int:
        """A request uses the first ``upto`` rows: background rows among them are reused."""
        reused = s.kv_background.count(1, 0, upto)
        if reused:
            s.kv_background[:upto] = bytes(min(upto, len(s.kv_background)))
            with self.stats.lock:
                self.stats.background.reused += reused
        return reused

    # -- ready positions ---------------------------------------------------------------

    def park(
        self, s: Session, key: str, source: str, ids: list[int], base: int,
        logits: list[torch.Tensor], forced: list[int],
    ) -> ReadyPosition:
        """Make and park the ready position at the end of ``ids + forced`` (what ``s``'s KV
        holds now): a fork of the KV, with the logits before each forced token and after the
        last; the session is cropped back to ``base``, the rows past it are the position's."""
        token, gap = top_gap(logits[0])
        rp = ReadyPosition(key=key, source=source, ids=list(ids), base=base, logits=logits, forced=forced,
                           token=token, gap=gap)
        old = s.ready.pop(rp.key, None)
        if old is not None:
            self.discard(old)
        charge = -(-rp.logits_bytes() // self.pool.block_bytes)  # at most this many more blocks taken
        if charge > self.pool.available() and (
            self.make_room is None or not self.make_room(s, charge, True, ())
        ):
            raise NoRoom
        rp.seq = s.kv.fork()
        rp.charge = self.pool.charge(rp.logits_bytes())
        s.ready[rp.key] = rp
        rp.background = s.kv_background[rp.base :]
        s.kv.crop(rp.base)
        del s.kv_background[rp.base :]
        return rp

    def valid(self, s: Session, rp: ReadyPosition) -> bool:
        """Whether ``rp``'s base is still what the session's KV holds: rows it still shares
        with the position's fork, or else the same ids (rows computed again since)."""
        if rp.seq is not None and s.kv.shares_rows(rp.seq, rp.base):
            return True
        return len(s.kv_ids) >= rp.base and s.kv_ids[: rp.base] == rp.ids[: rp.base]

    def restore(self, s: Session, rp: ReadyPosition, *, keep: bool) -> None:
        """Make ``rp``'s sequence the session's KV (a ready_exact hit): the session adopts
        it, or a fork of it when the position is kept (an ephemeral question). No row is
        copied; its forced answer tokens count as reused only once a request emits them."""
        assert rp.seq is not None
        self.crop(s, rp.base)
        if keep:
            s.kv.adopt_fork(rp.seq)
        else:
            s.kv.adopt(rp.seq)
            self.pool.uncharge(rp.charge)
            rp.charge = 0
        s.kv_background.extend(rp.background)  # the session's first rp.base rows stay its own
        self.take(s, len(rp.ids))

    def discard(self, rp: ReadyPosition) -> None:
        """Forget a ready position: its blocks go back, the idle work in its rows was wasted."""
        with self.stats.lock:
            self.stats.background.wasted += rp.background.count(1)
        if rp.seq is not None:
            rp.seq.release()
        self.pool.uncharge(rp.charge)
        rp.charge = 0
        rp.background = bytearray()

    def drop_ready(self, s: Session) -> None:
        """Discard every ready position of ``s``."""
        for rp in list(s.ready.values()):  # a copy: another thread may still be ending a step
            self.discard(rp)
        s.ready.clear()

    def drop_invalid(self, s: Session) -> None:
        """Discard the ready positions whose base the session's KV no longer holds."""
        for key, rp in list(s.ready.items()):
            if not self.valid(s, rp):
                s.ready.pop(key)
                self.discard(rp)
