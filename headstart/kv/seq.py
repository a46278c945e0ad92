"""One sequence's KV: a block table into the pool and the token ids whose rows it holds.

A session's KV, a ready position and a one-off request's KV are all ``KVSeq``s. ``fork``
shares every block, ``crop`` and ``adopt`` move table entries, ``release`` gives blocks
back; none touches a tensor. The one copy is *copy on write*: appending to a sequence
whose partly filled last block another sequence also holds first copies that block's
used rows (at most ``block_size - 1`` rows), so the other sequence's rows never change.
"""

from __future__ import annotations

from headstart.kv.pool import BlockPool, Reservation


class KVSeq:
    """A block table plus ``ids``: exactly the tokens whose KV rows are written."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __del__(self) -> None:
        # A sequence dropped without release (a discarded one-off request) gives its blocks back.
        if self.blocks:
            self.pool.decref(self.blocks)

    def nbytes(self) -> int:
        """Bytes of the blocks this table references (shared ones included)."""
        return len(self.blocks) * self.pool.block_bytes

    def _shared_tail(self) -> bool:
        """Whether the next row lands in a partly filled block another sequence holds."""
        return len(self.ids) % self.pool.block_size != 0 and self.pool.refs[self.blocks[-1]] > 1

    def blocks_needed(self, tokens: int) -> int:
        """Blocks that appending ``tokens`` rows would allocate (copy on write included)."""
        fresh = self.pool.blocks_for(len(self.ids) + tokens) - len(self.blocks)
        return fresh + (1 if tokens and self._shared_tail() else 0)

    def append(self, ids: list[int], reservation: Reservation | None = None) -> int:
        """Make room for ``ids``' rows and record them; returns the position of the first.

        The caller writes the rows (a forward); if it fails it crops back to the result.
        """
        pool = self.pool
        start = len(self.ids)
        if ids and self._shared_tail():
            old = self.blocks[-1]
            new = pool.alloc(reservation)
            pool.copy_rows(old, new, start % pool.block_size)
            pool.decref([old])
            self.blocks[-1] = new
        while len(self.blocks) < pool.blocks_for(start + len(ids)):
            self.blocks.append(pool.alloc(reservation, near=self.blocks[-1] if self.blocks else None))
        self.ids.extend(ids)
        return start

    def slots(self, start: int, count: int) -> list[int]:
        """Pool rows (block * block_size + offset) of positions ``start .. start+count``."""
        bs, blocks = self.pool.block_size, self.blocks
        return [blocks[p // bs] * bs + p % bs for p in range(start, start + count)]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` rows; whole blocks past them go back to the pool."""
        if length < 0 or length > len(self.ids):
            raise ValueError(f"cannot crop a sequence of {len(self.ids)} to {length}")
        keep = self.pool.blocks_for(length)
        if keep < len(self.blocks):
            self.pool.decref(self.blocks[keep:])
            del self.blocks[keep:]
        del self.ids[length:]

    def share(self, blocks: list[int], ids: list[int]) -> None:
        """Start this empty sequence on full blocks other holders keep (a prefix cache)."""
        if self.ids or len(ids) != len(blocks) * self.pool.block_size:
            raise ValueError("share needs an empty sequence and whole blocks")
        self.pool.incref(blocks)
        self.blocks, self.ids = list(blocks), list(ids)

    def shares_rows(self, other: KVSeq, length: int) -> bool:
        """Whether this sequence's first ``length`` rows are ``other``'s, in the same blocks (a
        fork's, until one of the two writes before ``length``). A block two sequences hold is
        never written (copy on write) nor handed out again, so both then hold the same tokens
        there: a check over the block table, not over every id."""
        n = self.pool.blocks_for(length)
        return min(len(self.ids), len(other.ids)) >= length and self.blocks[:n] == other.blocks[:n]

    def fork(self) -> KVSeq:
        """A second sequence sharing every block of this one."""
        other = KVSeq(self.pool)
        self.pool.incref(self.blocks)
        other.blocks, other.ids = list(self.blocks), list(self.ids)
        return other

    def adopt(self, other: KVSeq) -> None:
        """Take ``other``'s table and ids (``other`` is left empty): a move, no copy."""
        if other is self:
            return
        self.release()
        self.blocks, other.blocks = other.blocks, []
        self.ids, other.ids = other.ids, []

    def adopt_fork(self, other: KVSeq) -> None:
        """Become a fork of ``other``: ``adopt(other.fork())``, less the reference counting of
        the leading blocks the two already share (a ready position's fork and the session it
        was parked from share all but the last few)."""
        n = 0
        for mine, theirs in zip(self.blocks, other.blocks, strict=False):
            if mine != theirs:
                break
            n += 1
        self.pool.incref(other.blocks[n:])  # first: a block both hold further on never reaches 0
        self.pool.decref(self.blocks[n:])
        self.blocks[n:] = other.blocks[n:]
        self.ids = list(other.ids)

    def release(self) -> None:
        """Give every block back; the sequence is empty afterwards."""
        blocks, self.blocks = self.blocks, []
        self.ids = []
        if blocks:
            self.pool.decref(blocks)
