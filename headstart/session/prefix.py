"""A block-granular prefix cache shared by all requests: what vLLM or llama.cpp do.

This is the baseline a stateful session has to beat, so it is emulated honestly rather
than approximated by a session: KV is kept in the pool's fixed blocks, keyed by a hash
chain over the token ids (a block is found only when every token before it matches too),
shared across all requests whatever session they belong to, and evicted least-recently-
used once ``capacity`` blocks are held. A request reuses the longest run of cached full
blocks that its prompt starts with, so the reusable prefix is rounded down to a block
multiple, and computes the rest; afterwards every full block of its prompt and answer is
offered to the cache, as vLLM does with full decode blocks. There is no idle-time work.

The cache holds a reference to each of its pool blocks and a request's sequence starts
on them directly: attaching copies nothing, as in a paged-attention engine. The same
mechanism lets sessions with one long system prompt share its blocks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from headstart.kv import BlockPool
from headstart.session.session import Session


@dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    block: int  # the pool block; the cache holds one reference to it


class PrefixCache:
    """Cached KV blocks by hash chain, LRU, with counters."""

    def __init__(self, pool: BlockPool, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.pool = pool
        self.block = pool.block_size
        self.capacity = capacity
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self._lock = threading.Lock()
        self.hit_tokens = 0
        self.lookups = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, ids: list[int]) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(key, parent key, tokens) for every full block of ``ids``."""
        out = []
        parent: int | None = None
        for start in range(0, len(ids) - self.block + 1, self.block):
            tokens = tuple(ids[start : start + self.block])
            key = hash((parent, tokens))
            out.append((key, parent, tokens))
            parent = key
        return out

    def attach(self, s: Session, prompt: list[int]) -> int:
        """Start the empty session ``s`` on the cached blocks ``prompt`` starts with.

        Returns the number of tokens placed; the engine computes the rest as usual.
        """
        if s.kv_ids:
            raise ValueError("attach needs a session with no KV")
        with self._lock:
            found: list[tuple[int, _Block]] = []
            for key, parent, tokens in self._keys(prompt):
                b = self._blocks.get(key)
                if b is None or b.parent != parent or b.tokens != tokens:
                    break
                found.append((key, b))
            # Touch the tail first so a chain's parents stay more recent than its children:
            # eviction then takes leaves before the blocks others hang from.
            for key, _ in reversed(found):
                self._blocks.move_to_end(key)
            self.lookups += 1
            self.hit_tokens += len(found) * self.block
            s.kv.share([b.block for _, b in found], [t for _, b in found for t in b.tokens])
        s.kv_background.extend(bytes(len(s.kv_ids)))
        return len(s.kv_ids)

    def store(self, s: Session) -> int:
        """Offer every full block of ``s``'s KV to the cache; returns how many were new."""
        keys = self._keys(s.kv_ids)
        new = 0
        with self._lock:
            for i in reversed(range(len(keys))):
                key, parent, tokens = keys[i]
                if key not in self._blocks:
                    block = s.kv.blocks[i]
                    self.pool.incref([block])
                    self._blocks[key] = _Block(parent, tokens, block)
                    new += 1
                self._blocks.move_to_end(key)
            while len(self._blocks) > self.capacity:
                _, dropped = self._blocks.popitem(last=False)
                self.pool.decref([dropped.block])
                self.evicted += 1
        return new
