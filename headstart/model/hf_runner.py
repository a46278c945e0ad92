"""The fallback for architectures the own forward does not run: transformers over the pool.

Each feed runs alone (a batch of one): its rows are read out of the pool into a fresh
``DynamicCache``, the transformers model extends it, and the new rows are written back
to the sequence's blocks. That costs a copy of the sequence's KV per forward (what
transformers' own cache pays anyway), but the engine, its sessions, forks and budget
work the same for any causal LM transformers loads.
"""

from __future__ import annotations

import torch

from headstart.kv.pool import BlockPool
from headstart.model.hf import HFBackend


class HFRunner:
    """The runner contract (``pool``, ``forward(feeds)``) on a transformers model."""

    def __init__(self, backend: HFBackend, pool: BlockPool) -> None:
        self.backend = backend
        self.pool = pool
        self.forwards = 0

    @torch.inference_mode()
    def forward(self, feeds: list) -> list[torch.Tensor]:
        out = []
        for f in feeds:
            if not f.ids:
                raise ValueError("every feed needs at least one token")
            start = f.seq.append(f.ids, f.reservation)
            try:
                out.append(self._one(f.seq, start, f.ids, f.keep))
            except BaseException:
                f.seq.crop(start)
                raise
        self.forwards += 1
        return out

    def _one(self, seq, start: int, ids: list[int], keep: int) -> torch.Tensor:
        state = self.backend.new_state()
        if start:
            for layer, (k, v) in enumerate(self.pool.read(seq.blocks, start)):
                state.cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], layer)
            state.length = start
        logits = self.backend.forward(state, ids, keep=keep)
        rows = [(layer.keys[0, :, start:].transpose(0, 1), layer.values[0, :, start:].transpose(0, 1))
                for layer in state.cache.layers]
        slots = torch.tensor(seq.slots(start, len(ids)), device=self.pool.device)
        for layer, (k, v) in enumerate(rows):
            self.pool.put(layer, slots, k, v)
        return logits
