"""A session: what a conversation holds on the server between its requests.

The KV (a sequence in the model's block pool) always covers a prefix of the tokens the
session last saw, and ``kv_ids`` (the sequence's own ids) says exactly which tokens
those are. Nothing here assumes how the next request will look: the engine compares
ids and crops.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from headstart.config import MAX_PENDING, QUERY_MAX_TOKENS
from headstart.kv import BlockPool, KVSeq, Reservation
from headstart.session.events import EventHub
from headstart.session.feed import DataFeed
from headstart.session.store import StoredSession
from headstart.session.template import Message, RenderCache


@dataclass
class ReadyPosition:
    """A cached state at a decision point, held apart from the session's own KV.

    ``ids`` is the predicted prompt, ending where the answer starts. ``forced`` are answer
    tokens the model was sure of past that point, and ``logits[i]`` is the distribution
    after ``ids + forced[:i]``: the first is the cached distribution the gate judges, the
    last is at the decision point. ``seq`` is a fork of the session's KV that goes on to
    the end of ``ids + forced``: it shares every block up to ``base`` with the session.
    ``charge`` is the blocks' worth of budget its logits take.
    """

    key: str
    source: str
    ids: list[int]
    base: int
    logits: list[torch.Tensor]
    forced: list[int]
    token: int  # the argmax of logits[0] (top_gap's, the greedy pick of it)
    gap: float
    background: bytearray = field(default_factory=bytearray)  # which rows past base idle work computed
    seq: KVSeq | None = None  # set when parked
    charge: int = 0  # bytes of its logits, charged to the pool's budget

    def logits_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.logits)


@dataclass
class Query:
    """A registered question and its last answer."""

    id: str
    question: str
    max_tokens: int = QUERY_MAX_TOKENS
    fast_answer: list[str] | None = None
    created: float = field(default_factory=time.time)
    value: str | None = None
    token_ids: list[int] = field(default_factory=list)
    confidence: float | None = None
    candidate: int | None = None
    data_version: int | None = None
    turns: int | None = None
    answered_at: float | None = None
    evaluations: int = 0
    error: str | None = None

    def fresh(self, s: Session) -> bool:
        """Answered on the session's current context (same data version, same turns)."""
        return self.data_version == s.data.version and self.turns == s.turns

    def to_dict(self) -> dict[str, Any]:
        """What must survive a restart: the question, not its answer (recomputed on start)."""
        return {"id": self.id, "question": self.question, "max_tokens": self.max_tokens,
                "fast_answer": self.fast_answer, "created": self.created}

    def describe(self, s: Session) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "session.query",
            "question": self.question,
            "max_tokens": self.max_tokens,
            "fast_answer": self.fast_answer,
            "created": int(self.created),
            "value": self.value,
            "confidence": self.confidence,
            "candidate": self.candidate,
            "data_version": self.data_version,
            "fresh": self.fresh(s),
            "answered_at": self.answered_at,
            "evaluations": self.evaluations,
            "error": self.error,
        }


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

    def __init__(self, session_id: str, pool: BlockPool, owner: str | None = None) -> None:
        self.id = session_id
        self.owner = owner
        self.created = time.time()
        self.last_used = self.created
        self.settings = SessionSettings()
        self.messages: list[Message] = []
        self.tools: list[dict[str, Any]] | None = None
        self.renders = RenderCache()  # what its next rendering reuses
        self.kv = KVSeq(pool)
        # 1 for each KV row background work computed and no request has used yet; bytes, so a
        # request counts and clears them at C speed on its critical path.
        self.kv_background = bytearray()
        self.entry_len: int | None = None
        self.ready: dict[str, ReadyPosition] = {}
        self.busy = False
        # Blocks promised to the request being computed (None when none runs): the budget
        # keeps this room for it and never evicts the session meanwhile.
        self.reserved: Reservation | None = None
        self.turns = 0
        self.paths: Counter[str] = Counter()
        self.last_delta: str | None = None
        # The sessions API (idle/: ingest.py, queries.py, job.py): streamed data, registered
        # questions (id -> Query), listeners, and the state of the idle-time job.
        self.data = DataFeed(MAX_PENDING)
        self.queries: dict[str, Any] = {}
        self.events = EventHub()
        self.upkeep_lock = threading.Lock()
        self.upkeep_queued = False
        self.warm_ticket: Any = None
        self.prepos_epoch = 0  # bumped when someone asks for a fresh pre-positioning
        self.positioned_epoch = -1
        self.positioned_entry: list[int] | None = None
        self._evicted = False
        self.deleted = False
        self.epoch = 0  # this replica's claim on the session in a shared store (registry.py)

    @property
    def kv_ids(self) -> list[int]:
        """The tokens whose KV rows the session holds (its sequence's ids)."""
        return self.kv.ids

    def to_stored(self) -> StoredSession:
        """The part of the session that must survive a restart."""
        return StoredSession(
            id=self.id,
            owner=self.owner,
            created=self.created,
            last_used=self.last_used,
            turns=self.turns,
            settings=self.settings.to_dict(),
            messages=list(self.messages),  # a snapshot: the writer thread serialises it later
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
    def from_stored(cls, stored: StoredSession, pool: BlockPool) -> Session:
        """A session as it was stored, with no KV yet (its next request rebuilds it)."""
        s = cls(stored.id, pool, stored.owner)
        s.created, s.last_used, s.turns = stored.created, stored.last_used, stored.turns
        s.epoch = stored.epoch
        s.settings = SessionSettings.from_dict(stored.settings)
        s.messages, s.tools = stored.messages, stored.tools
        s.paths.update(stored.paths)
        s.last_delta = stored.state.get("last_delta")
        if "data" in stored.state:
            s.data = DataFeed.restore(stored.state["data"])
        for q in stored.state.get("queries", []):
            s.queries[q["id"]] = Query(q["id"], q["question"], q["max_tokens"], q["fast_answer"], q["created"])
        s.evicted = True
        return s

    @property
    def evicted(self) -> bool:
        """Its KV was evicted or lost in a restart, and nothing has rebuilt any of it since
        (a request or idle work that computes KV for it ends this)."""
        if self._evicted and self.kv_ids:
            self._evicted = False
        return self._evicted

    @evicted.setter
    def evicted(self, value: bool) -> None:
        self._evicted = value

    def ready_bytes(self) -> int:
        """Bytes the ready positions add to the session's own KV: the blocks only they hold
        (each counted once, however many positions share it) and their logits."""
        own = set(self.kv.blocks)
        extra: set[int] = set()
        charge = 0
        for rp in list(self.ready.values()):  # one step: the model thread may be changing the dict
            if rp.seq is not None:
                extra.update(rp.seq.blocks)
            charge += rp.charge
        return len(extra - own) * self.kv.pool.block_bytes + charge

    def kv_bytes(self) -> int:
        """Bytes of KV this session holds: its own blocks and what its ready positions add."""
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
