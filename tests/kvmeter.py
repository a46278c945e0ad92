"""Resident KV measured from the tensors themselves, not from the engine's own count.

The budget's promise ("all sessions' KV plus their ready positions stay within
``--kv-budget``") is checked here without asking the planner: after every model call that
can grow KV (``forward``, ``extend``: every step) the meter adds up the memory of every KV
tensor the engine holds, by storage, so a cropped view that still pins its whole buffer
counts in full. :func:`held_kv_bytes` is the one place that knows where KV tensors live;
when KV moves into a block pool, point it at the pool's tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from headstart.engine import Engine


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors of one KV state (HFState), a detached suffix (HFSuffix) or a list of logits."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif hasattr(obj, "cache"):  # HFState: a DynamicCache, one keys/values pair per layer
        for layer in obj.cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    yield t
    elif hasattr(obj, "rows"):  # HFSuffix
        for k, v in obj.rows:
            yield k
            yield v
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def held_kv_bytes(engine: Engine, also: Iterable[Any] = (), *, pinned: bool = True) -> int:
    """Bytes of memory behind every KV tensor the engine holds: each session's (one-off
    requests' too) cache, and each ready position's rows and kept logits; ``also`` adds
    states the engine is handling but has not attached to a session yet. With ``pinned``
    each tensor counts its whole storage (shared storages once), else only its own
    elements (what the engine's count claims to be)."""
    sessions = engine.sessions._holding_kv()
    storages: dict[int, int] = {}
    holders: list[Any] = list(also)
    for s in sessions:
        holders.append(s.kv)
        for rp in list(s.ready.values()):
            holders.append(rp.suffix)
            holders.append(rp.logits)
    own = 0
    for holder in holders:
        for t in _tensors(holder):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            own += t.numel() * t.element_size()
    return sum(storages.values()) if pinned else own


class KVMeter:
    """Wraps a backend's KV-growing calls and records resident KV after each one.

    ``engine`` is a callable because a served engine is built inside the server after the
    meter is in place.
    """

    GROWING = ("forward", "extend")

    def __init__(self, backend: Any, engine: Callable[[], Engine | None]) -> None:
        self.backend = backend
        self.engine = engine
        self.peak = 0
        self.peak_at = ""  # the call after which the peak was seen
        self.samples = 0

    def _wrap(self, name: str) -> Callable[..., Any]:
        original = getattr(self.backend, name)

        def measured(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            engine = self.engine()
            if engine is not None:
                # The state being worked on may not be attached to a session yet (a reload).
                extra = [a for a in args if hasattr(a, "cache")]
                held = held_kv_bytes(engine, extra)
                if held > self.peak:
                    self.peak, self.peak_at = held, name
                self.samples += 1
            return out

        return measured

    def __enter__(self) -> KVMeter:
        for name in self.GROWING:
            setattr(self.backend, name, self._wrap(name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.GROWING:
            del self.backend.__dict__[name]
