"""A session: what a conversation holds on the server between its requests.

The KV state always covers a prefix of the tokens the session last saw, and ``kv_ids``
says exactly which tokens those are. Nothing here assumes how the next request will
look: the engine compares ids and crops.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from headstart.events import EventHub
from headstart.ingest import DataFeed
from headstart.model.backend import Backend, KVState, KVSuffix
from headstart.store import StoredSession
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
    background: list[bool] = field(default_factory=list)  # which suffix rows idle work computed
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
        # Bytes of KV the request being computed may grow to (0 when none runs): the
        # budget keeps this room for it and never evicts the session meanwhile.
        self.reserved = 0
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
        self.evicted = False
        self.deleted = False
        self.epoch = 0  # this replica's claim on the session in a shared store (registry.py)

    def to_stored(self) -> StoredSession:
        """The part of the session that must survive a restart."""
        return StoredSession(
            id=self.id,
            owner=self.owner,
            created=self.created,
            last_used=self.last_used,
            turns=self.turns,
            settings=self.settings.to_dict(),
            messages=self.messages,
            tools=self.tools,
            paths=dict(self.paths),
            state={
                "last_delta": self.last_delta,
                "data": self.data.snapshot(),
                "queries": [q.to_dict() for q in list(self.queries.values())],
            },
            epoch=self.epoch,
        )

    @classmethod
    def from_stored(cls, stored: StoredSession, backend: Backend) -> Session:
        """A session as it was stored, with no KV yet (its next request rebuilds it)."""
        s = cls(stored.id, backend, stored.owner)
        s.created, s.last_used, s.turns = stored.created, stored.last_used, stored.turns
        s.epoch = stored.epoch
        s.settings = SessionSettings.from_dict(stored.settings)
        s.messages, s.tools = stored.messages, stored.tools
        s.paths.update(stored.paths)
        s.last_delta = stored.state.get("last_delta")
        if "data" in stored.state:
            s.data = DataFeed.restore(stored.state["data"])
        from headstart.queries import Query  # queries builds on this module

        for q in stored.state.get("queries", []):
            s.queries[q["id"]] = Query(q["id"], q["question"], q["max_tokens"], q["fast_answer"], q["created"])
        s.evicted = True
        return s

    def ready_bytes(self) -> int:
        # list() takes the values in one step: the model thread may be changing the dict.
        return sum(r.nbytes() for r in list(self.ready.values()))

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
            "evicted": self.evicted,
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
