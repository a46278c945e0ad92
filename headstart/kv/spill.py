"""Evicted KV on disk, reloaded instead of recomputed.

On the CPU, writing a session's KV and reading it back is two orders of magnitude faster
than the prefill that would rebuild it, so spilling is on by default there (the figures,
from ``python -m headstart.bench.spill``, are in the README's "Sessions that survive"). On a
GPU recomputing is cheap, and ``auto`` leaves it off there.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from headstart.kv import BlockPool, KVSeq

log = logging.getLogger("headstart.spill")


class Spill:
    """A folder of per-session KV files under a byte budget (oldest dropped first).

    A file holds a sequence's rows copied out of its blocks, per layer, and the ids they
    cover; reloading copies them into freshly allocated blocks.
    """

    def __init__(self, folder: str | os.PathLike[str], pool: BlockPool, limit_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pool = pool
        self.limit = limit_bytes
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()
        for path in sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            self._files[path.stem] = path.stat().st_size
        for stale in self.folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)

    def _path(self, session_id: str) -> Path:
        return self.folder / f"{session_id}.safetensors"

    def save(self, session_id: str, seq: KVSeq) -> None:
        """Write a session's KV rows and the ids they cover (atomically: a crash leaves no half file)."""
        if not seq.ids:
            return
        path = self._path(session_id)
        tensors: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(self.pool.read(seq.blocks, len(seq))):
            tensors[f"k{i}"], tensors[f"v{i}"] = k.cpu(), v.cpu()
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata={"ids": json.dumps(seq.ids)})
        os.replace(tmp, path)
        with self._lock:
            self._files[session_id] = path.stat().st_size
            self._files.move_to_end(session_id)
            while sum(self._files.values()) > self.limit and len(self._files) > 1:
                oldest, _ = self._files.popitem(last=False)
                self._path(oldest).unlink(missing_ok=True)

    def take(self, session_id: str) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The spilled ids and per-layer rows of a session (and forget the file), or None."""
        with self._lock:
            if self._files.pop(session_id, None) is None:
                return None
        path = self._path(session_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                ids = json.loads((f.metadata() or {})["ids"])
                rows = [(f.get_tensor(f"k{i}"), f.get_tensor(f"v{i}")) for i in range(len(self.pool.k))]
        except Exception:  # a damaged file is only a lost cache
            log.warning("could not reload spilled KV of %s; recomputing", session_id, exc_info=True)
            return None
        finally:
            path.unlink(missing_ok=True)
        if any(k.shape[0] != len(ids) for k, _ in rows):
            return None
        return ids, rows

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._files.pop(session_id, None)
        self._path(session_id).unlink(missing_ok=True)
