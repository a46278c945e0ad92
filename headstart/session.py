"""A session: what a conversation holds on the server between its requests.

The KV state always covers a prefix of the tokens the session last saw, and ``kv_ids``
says exactly which tokens those are. Nothing here assumes how the next request will
look: the engine compares ids and crops.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from headstart.events import EventHub
from headstart.ingest import DataFeed
from headstart.model.backend import Backend, KVState, KVSuffix
from headstart.template import Message

DEFAULT_MAX_PENDING = 1024


@dataclass
class ReadyPosition:
    """A cached state at a decision point, held apart from the session's own KV.

    ``ids`` is the predicted prompt, ending where the answer starts. ``forced`` are answer
    tokens the model was sure of past that point, and ``logits[i]`` is the distribution
    after ``ids + forced[:i]``: the first is the cached distribution the gate judges, the
    last is at the decision point. ``suffix`` holds the KV rows from ``base`` to the end.
    """

    key: str
    source: str
    ids: list[int]
    base: int
    suffix: KVSuffix
    logits: list[torch.Tensor]
    forced: list[int]
    token: int
    gap: float
    created: float = field(default_factory=time.time)

    def nbytes(self) -> int:
        return self.suffix.nbytes() + sum(t.numel() * t.element_size() for t in self.logits)

    @property
    def tokens(self) -> int:
        return self.suffix.length


@dataclass
class SessionSettings:
    pre_position: bool = True
    gate: bool | None = None  # None: follow the server
    gap_threshold: float | None = None
    hint: str | None = None  # what the client says the next message will be


class Session:
    """Messages, token ids and KV of one conversation, with its counters."""

    def __init__(self, session_id: str, backend: Backend, owner: str | None = None) -> None:
        self.id = session_id
        self.owner = owner
        self.created = time.time()
        self.last_used = self.created
        self.settings = SessionSettings()
        self.messages: list[Message] = []
        self.tools: list[dict[str, Any]] | None = None
        self.kv: KVState = backend.new_state()
        self.kv_ids: list[int] = []
        # Which KV rows background work computed and no request has used yet.
        self.kv_background: list[bool] = []
        self.entry_len: int | None = None
        self.ready: dict[str, ReadyPosition] = {}
        self.busy = False
        self.turns = 0
        self.paths: Counter[str] = Counter()
        self.pre_positioning = False
        self.last_delta: str | None = None
        # The sessions API (ingest.py, queries.py, upkeep.py): streamed data, registered
        # questions (id -> queries.Query), listeners, and the state of the idle-time job.
        self.data = DataFeed(DEFAULT_MAX_PENDING)
        self.queries: dict[str, Any] = {}
        self.events = EventHub()
        self.upkeep_lock = threading.Lock()
        self.upkeep_queued = False
        self.warm_ticket: Any = None
        self.prepos_epoch = 0  # bumped when someone asks for a fresh pre-positioning
        self.positioned_epoch = -1
        self.positioned_entry: list[int] | None = None

    def ready_bytes(self) -> int:
        return sum(r.nbytes() for r in list(self.ready.values()))  # a copy: doors read it too

    def kv_bytes(self) -> int:
        """Bytes of KV this session holds: its own cache and its ready positions."""
        return self.kv.nbytes() + self.ready_bytes()

    def describe(self) -> dict[str, Any]:
        nxt = self.ready.get("next")
        data = self.data.counters()
        return {
            "id": self.id,
            "created": int(self.created),
            "last_used": int(self.last_used),
            "tokens": len(self.kv_ids),
            "kv_tokens": len(self.kv),
            "busy": self.busy,
            "turns": self.turns,
            "pre_position": self.settings.pre_position,
            "ready": nxt is not None,
            "ready_token": nxt.token if nxt else None,
            "ready_gap": nxt.gap if nxt else None,
            "entry_tokens": self.entry_len,
            "paths": dict(self.paths),
            "data_version": data["data_version"],
            "pending": data["pending"],
            "pushed": data["pushed"],
            "ingested": data["ingested"],
            "dropped": data["dropped"],
            "window": self.data.window,
            "queries": len(self.queries),
            "messages": len(self.messages),
        }
