"""Evicted KV on disk, reloaded instead of recomputed.

Measured here (2 CPU cores, default model): recomputing 2,048 tokens of KV takes ~6 s of
prefill, writing them to disk 0.04 s and reading them back well under 0.1 s, so on the
CPU spilling wins by two orders of magnitude and is on by default. On a GPU the prefill
itself takes tens of milliseconds and disk reads do not win: ``auto`` leaves it off there.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from headstart.model.backend import Backend, KVState

log = logging.getLogger("headstart.spill")


class Spill:
    """A folder of per-session KV files under a byte budget (oldest dropped first)."""

    def __init__(self, folder: str | os.PathLike[str], backend: Backend, limit_bytes: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.limit = limit_bytes
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()
        for path in sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            self._files[path.stem] = path.stat().st_size
        for stale in self.folder.glob("*.tmp"):
            stale.unlink(missing_ok=True)

    def _path(self, session_id: str) -> Path:
        return self.folder / f"{session_id}.safetensors"

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(self._files.values())

    def save(self, session_id: str, ids: list[int], state: KVState) -> None:
        """Write a session's KV and the ids it covers."""
        if not ids:
            return
        path = self._path(session_id)
        self.backend.save_state(state, str(path), {"ids": json.dumps(ids)})
        with self._lock:
            self._files[session_id] = path.stat().st_size
            self._files.move_to_end(session_id)
            while sum(self._files.values()) > self.limit and len(self._files) > 1:
                oldest, _ = self._files.popitem(last=False)
                self._path(oldest).unlink(missing_ok=True)

    def take(self, session_id: str) -> tuple[list[int], KVState] | None:
        """The spilled KV of a session (and forget the file), or None."""
        with self._lock:
            if self._files.pop(session_id, None) is None:
                return None
        path = self._path(session_id)
        try:
            state, metadata = self.backend.load_state(str(path))
            ids = json.loads(metadata["ids"])
        except Exception:  # a damaged file is only a lost cache
            log.warning("could not reload spilled KV of %s; recomputing", session_id, exc_info=True)
            return None
        finally:
            path.unlink(missing_ok=True)
        if len(ids) != len(state):
            return None
        return ids, state

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._files.pop(session_id, None)
        self._path(session_id).unlink(missing_ok=True)
