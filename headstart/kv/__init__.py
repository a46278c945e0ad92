"""Paged KV: one block pool per model and the sequences that address it."""

from headstart.kv.pool import BlockPool, NoBlocks, Reservation
from headstart.kv.seq import KVSeq

__all__ = ["BlockPool", "KVSeq", "NoBlocks", "Reservation"]
