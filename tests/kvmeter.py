"""Resident KV measured from what holds it, not from the engine's own count.

The budget's promise ("all sessions' KV plus their ready positions stay within
``--kv-budget``") is checked here without asking the planner: after every forward (every
step) the meter adds up the memory of the KV the engine holds. KV lives in the model's
block pool, so that is the blocks the engine's sequences reference (each once, however many
sequences share it) plus the ready positions' logits tensors; with ``pinned`` the blocks
are read off the pool's reference counts instead, so a block some forgotten sequence still
holds counts too. :func:`held_kv_bytes` is the one place that knows where KV lives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from headstart.engine.engine import Engine
from headstart.kv.pool import SCRATCH
from headstart.model.hf_runner import HFRunner
from headstart.model.runner import Runner


def held_kv_bytes(engine: Engine, also: Iterable[Any] = (), *, pinned: bool = True) -> int:
    """Bytes of KV the engine holds: each session's (one-off requests' too) blocks, each
    ready position's blocks and kept logits; ``also`` adds sequences the engine is handling
    but has not attached to a session yet. With ``pinned``, every block the pool counts as
    referenced (whoever references it), and the logits' whole storages."""
    pool = engine.pool
    blocks: set[int] = set()
    logits_own = 0
    storages: dict[int, int] = {}
    for seq in also:
        blocks.update(seq.blocks)
    for s in engine.sessions._holding_kv():
        blocks.update(s.kv.blocks)
        for rp in list(s.ready.values()):
            if rp.seq is not None:
                blocks.update(rp.seq.blocks)
            for t in rp.logits:
                logits_own += t.numel() * t.element_size()
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    if pinned:
        referenced = sum(1 for b, r in enumerate(pool.refs) if r and b != SCRATCH)
        return referenced * pool.block_bytes + sum(storages.values())
    return len(blocks) * pool.block_bytes + logits_own


class KVMeter:
    """Wraps the runners' forwards and records resident KV after each one.

    ``engine`` is a callable because a served engine is built inside the server after the
    meter is in place; ``backend`` names the model whose engine is measured.
    """

    RUNNERS = (Runner, HFRunner)

    def __init__(self, backend: Any, engine: Callable[[], Engine | None]) -> None:
        self.backend = backend
        self.engine = engine
        self.peak = 0
        self.peak_at = ""  # the call after which the peak was seen
        self.samples = 0
        self._originals: dict[type, Callable[..., Any]] = {}

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def measured(runner: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(runner, *args, **kwargs)
            engine = self.engine()
            if engine is not None and engine.runner is runner:
                held = held_kv_bytes(engine)
                if held > self.peak:
                    self.peak, self.peak_at = held, "forward"
                self.samples += 1
            return out

        return measured

    def __enter__(self) -> KVMeter:
        for cls in self.RUNNERS:
            self._originals[cls] = cls.forward
            cls.forward = self._wrap(cls.forward)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, original in self._originals.items():
            cls.forward = original  # type: ignore[method-assign]
