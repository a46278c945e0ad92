"""One KV pool per model: fixed-size blocks in per-layer tensors, shared by reference count.

Every sequence (a session's KV, a ready position, a one-off request) is a table of block
numbers into these tensors, so forking, cropping and adopting a sequence are bookkeeping,
never tensor copies. The KV budget is the number of blocks that may be in use: checking
it is O(1), and ``used * block_bytes`` is the physical truth (no cropped views or clones
hide memory). Block 0 is scratch: rows a forward pads with are written there and never read.

The layout of a layer's tensor is the attention kernel's: *head-major* by default,
``(kv_heads, blocks, block_size, dim)``, so a sequence whose blocks are consecutive is one
strided view per KV head with contiguous rows (the CPU kernels read it in place, no
gather); ``paged=True`` is ``(blocks, block_size, kv_heads, dim)``, what the paged flash
kernel on CUDA takes. Only this class and the kernels index the tensors.

Ready positions' logits live beside the tensors; their bytes are *charged* to the same
budget, so the one count covers everything the KV budget promises to bound.

A *reservation* promises blocks to a running request. Blocks it has not drawn yet count as
taken for everyone else, so work admitted later can never eat the room an admitted
request will grow into.
"""

from __future__ import annotations

import threading

import torch

SCRATCH = 0


class NoBlocks(Exception):
    """The budget has no free block for an allocation that holds no reservation."""


class Reservation:
    """Blocks promised to one request; drawn as its sequences grow, the rest given back."""

    def __init__(self, pool: BlockPool, blocks: int) -> None:
        self.pool = pool
        self.left = blocks

    def release(self) -> None:
        with self.pool.lock:
            self.pool.reserved -= self.left
            self.left = 0


class BlockPool:
    """The KV tensors of one model and the ownership of their blocks."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        block_size: int,
        budget_bytes: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        physical_bytes: int | None = None,
        paged: bool = False,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.token_bytes = 2 * layers * kv_heads * head_dim * dtype.itemsize
        self.block_bytes = self.token_bytes * block_size
        # Physical blocks: the budget, capped by what the machine can hold (a budget may be
        # set far above it; on the CPU untouched pages cost nothing).
        cap = budget_bytes if physical_bytes is None else min(budget_bytes, physical_bytes)
        blocks = max(2, cap // self.block_bytes + 1)  # +1: the scratch block
        self.paged = paged
        shape = (blocks, block_size, kv_heads, head_dim) if paged else (kv_heads, blocks, block_size, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.num_blocks = blocks
        self.limit = budget_bytes // self.block_bytes  # blocks that may be in use (the budget)
        self.refs = [0] * blocks
        self.refs[SCRATCH] = 1
        self._free = set(range(1, blocks))
        # Masked rows still enter products (times zero), so every block must hold finite
        # values: zero each one the first time it is handed out (untouched pages stay free).
        self._never_used = set(range(blocks))
        self._zero(SCRATCH)
        self.used = 0  # blocks referenced by some sequence
        self.charged = 0  # bytes held beside the tensors (ready positions' logits)
        self.reserved = 0  # promised to reservations, not drawn yet
        self.peak = 0  # the most bytes ever resident
        self.lock = threading.RLock()

    # -- the budget -------------------------------------------------------------------

    @property
    def taken(self) -> int:
        """Blocks counted against the budget: in use, charged (rounded up) and promised."""
        return self.used + -(-self.charged // self.block_bytes) + self.reserved

    def resident_bytes(self) -> int:
        """Bytes held: blocks in use and charged bytes."""
        return self.used * self.block_bytes + self.charged

    def available(self) -> int:
        """Blocks an allocation without a reservation may still take."""
        return min(self.limit - self.taken, len(self._free))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, blocks: int) -> Reservation:
        """Promise ``blocks`` to a request (the caller has checked :meth:`available`)."""
        with self.lock:
            self.reserved += blocks
            self._note_peak()
            return Reservation(self, blocks)

    def charge(self, nbytes: int) -> int:
        """Count ``nbytes`` held outside the tensors against the budget; returns them."""
        with self.lock:
            self.charged += nbytes
            self._note_peak()
        return nbytes

    def uncharge(self, nbytes: int) -> None:
        with self.lock:
            self.charged -= nbytes

    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.resident_bytes())

    # -- blocks -----------------------------------------------------------------------

    def alloc(self, reservation: Reservation | None = None, near: int | None = None) -> int:
        """A free block (the one after ``near`` when free: contiguous tables read faster)."""
        with self.lock:
            if reservation is not None and reservation.left > 0:
                reservation.left -= 1
                self.reserved -= 1
            elif self.limit - self.taken < 1:
                raise NoBlocks(f"the KV budget of {self.limit} blocks is used up")
            if not self._free:
                raise NoBlocks("every physical KV block is in use")
            b = near + 1 if near is not None and near + 1 in self._free else self._free.pop()
            self._free.discard(b)
            if b in self._never_used:
                self._zero(b)
            self.refs[b] = 1
            self.used += 1
            self._note_peak()
            return b

    def _zero(self, b: int) -> None:
        self._never_used.discard(b)
        for t in (*self.k, *self.v):
            self._block(t, b).zero_()

    def _block(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Block ``b`` of a layer's tensor as (block_size, kv_heads, dim), in either layout."""
        return t[b] if self.paged else t[:, b].transpose(0, 1)

    # -- rows -------------------------------------------------------------------------

    def put(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (T, kv_heads, dim) rows of keys and values into pool rows ``slots``
        (block * block_size + offset) of ``layer``."""
        for t, x in ((self.k[layer], k), (self.v[layer], v)):
            x = x.to(self.dtype)
            if self.paged:
                t.view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, x)
            else:
                t.view(self.kv_heads, -1, self.head_dim).index_copy_(1, slots, x.transpose(0, 1))

    def heads(self, t: torch.Tensor, blocks: tuple[int, int] | torch.Tensor, length: int) -> torch.Tensor:
        """The first ``length`` rows of a table as (kv_heads, length, dim): a view when
        ``blocks`` is a run (first, count) of consecutive blocks in the head-major layout,
        else a gather (``blocks`` a tensor of block numbers)."""
        if isinstance(blocks, tuple):
            first, n = blocks
            part = t[first : first + n] if self.paged else t[:, first : first + n]
        else:
            part = t.index_select(0 if self.paged else 1, blocks)
        if self.paged:
            return part.flatten(0, 1)[:length].transpose(0, 1)
        return part.flatten(1, 2)[:, :length]

    def incref(self, blocks: list[int]) -> None:
        with self.lock:
            for b in blocks:
                self.refs[b] += 1

    def decref(self, blocks: list[int]) -> None:
        with self.lock:
            for b in blocks:
                self.refs[b] -= 1
                if self.refs[b] == 0:
                    self._free.add(b)
                    self.used -= 1

    def copy_rows(self, src: int, dst: int, rows: int) -> None:
        """Copy the first ``rows`` rows of block ``src`` into ``dst`` in every layer."""
        for t in (*self.k, *self.v):
            self._block(t, dst)[:rows].copy_(self._block(t, src)[:rows])

    # -- rows for spilling ----------------------------------------------------------

    def read(self, blocks: list[int], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the first ``length`` rows of the table ``blocks`` as (rows, heads, dim) copies."""
        index = torch.tensor(blocks, device=self.device)
        return [
            (self.heads(k, index, length).transpose(0, 1).contiguous(),
             self.heads(v, index, length).transpose(0, 1).contiguous())
            for k, v in zip(self.k, self.v, strict=True)
        ]

    def write(self, blocks: list[int], rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write rows (as :meth:`read` returns them) into the table ``blocks``."""
        length = rows[0][0].shape[0]
        slots = torch.tensor(
            [blocks[i // self.block_size] * self.block_size + i % self.block_size for i in range(length)],
            device=self.device,
        )
        for layer, (k, v) in enumerate(rows):
            self.put(layer, slots, k.to(self.device), v.to(self.device))
