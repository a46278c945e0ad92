"""Bodies of the sessions API, validated with pydantic, and the objects it answers with.

Our own endpoints refuse unknown fields (a typo should be a 400 naming the field, not a
silently ignored setting); a few names of the closest product's API are accepted as
aliases. The response models are what the door serialises through, so the OpenAPI schema
it serves is the shape clients really get.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from headstart.idle.ingest import MIN_WINDOW
from headstart.server.schema import SamplingFields

ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
QUERY_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TEXT = 200_000  # characters of one system prompt, entry, question or prompt
MAX_ENTRIES = 1024  # entries in one push


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionRequest(Strict):
    id: str | None = Field(default=None, pattern=ID_PATTERN, description="1-128 of A-Z a-z 0-9 _ -; default: generated")
    system: str | None = Field(default=None, max_length=MAX_TEXT, description="system prompt, prefilled at once")
    pre_position: bool = Field(
        default=True,
        validation_alias=AliasChoices("pre_position", "pre_decode"),
        description="spend idle time moving the session to its next decision point",
    )
    # The most a window may be depends on the model (its context less --context-reserve): the
    # engine checks it, and /openapi.json states it as the maximum once the model is loaded.
    window: int | None = Field(
        default=None, ge=MIN_WINDOW, description=f"sliding window in tokens, {MIN_WINDOW} up to the model's "
        "context less the server's --context-reserve: the oldest data is dropped past it"
    )
    gate: bool | None = Field(default=None, description="allow answers from a cached distribution (default: server)")
    gap_threshold: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False, description="the gate's logit-gap threshold"
    )


class PushRequest(Strict):
    entries: list[str] = Field(min_length=1, max_length=MAX_ENTRIES, description="text entries, oldest first")

    @field_validator("entries")
    @classmethod
    def _entries(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            if len(text) > MAX_TEXT:
                raise ValueError(f"entry {i} is longer than {MAX_TEXT} characters")
        return value


class GenerateRequest(SamplingFields):
    """A prompt asked against the session's current context, which it leaves unchanged."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_TEXT, description="the question, as a user message")
    model: str | None = None


class QueryRequest(Strict):
    question: str = Field(
        min_length=1, max_length=MAX_TEXT, validation_alias=AliasChoices("question", "prompt"),
        description="asked again after every ingested batch",
    )
    id: str | None = Field(default=None, pattern=QUERY_ID_PATTERN, description="default: generated")
    max_tokens: int = Field(default=8, ge=1, le=32, description="tokens of the answer kept")
    fast_answer: list[str] | None = Field(
        default=None, min_length=1, max_length=64, description="candidate answers: the best by first-token logit"
    )

    @field_validator("fast_answer")
    @classmethod
    def _candidates(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not c or len(c) > 1000 for c in value):
            raise ValueError("candidates must be non-empty strings of at most 1000 characters")
        return value


# -- responses ----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class GateCalibration(BaseModel):
    open: bool
    threshold: float | None = Field(description="the logit gap from which the gate fires; null: closed")
    precision: float | None = Field(description="precision of the verified answers at or above it")
    bound: float | None = Field(description="the lower confidence bound of that precision")
    coverage: float = Field(description="share of the key's verified answers at or above the threshold")
    fired: int
    n: int = Field(description="verified answers (gate answers and shadow checks) it rests on")
    reason: str | None = Field(description="why it is closed")


class GateState(BaseModel):
    """The gate for a streamed turn on this session (non-streamed answers are always exact)."""

    enabled: bool
    open: bool
    threshold: float | None
    key: str | None = Field(description="the calibration key that decided; null for a fixed threshold")
    reason: str | None
    target: float
    confidence: float
    keys: dict[str, GateCalibration]


class SessionObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["session"] = "session"
    created: int
    last_used: int
    tokens: int = Field(description="tokens the session's KV holds")
    kv_tokens: int
    kv_bytes: int = Field(description="bytes of KV held: the session's cache and its ready positions")
    busy: bool = Field(description="a request is in flight")
    working: bool = Field(description="idle-time work is queued")
    turns: int
    messages: int
    data_version: int = Field(description="batches of pushed data that are KV-resident")
    pending: int = Field(description="pushed entries not yet KV-resident")
    pushed: int
    ingested: int
    dropped: int = Field(description="entries dropped because the queue was full")
    window: int | None
    queries: int
    listeners: int
    pre_position: bool
    ready: bool = Field(description="a ready position for the next turn is parked")
    ready_token: int | None
    ready_gap: float | None
    entry_tokens: int | None
    paths: dict[str, int] = Field(description="requests served per path")
    gate: GateState


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionObject]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


class PushResponse(BaseModel):
    object: Literal["session.push"] = "session.push"
    session_id: str
    pushed: int = Field(description="entries accepted by this push")
    dropped: int = Field(description="waiting entries this push pushed out of the full queue (oldest first)")
    pending: int = Field(description="entries waiting to be ingested, this push's included")
    data_version: int = Field(description="the version now KV-resident; it goes up as batches are ingested")
    max_pending: int


class QueryObject(BaseModel):
    id: str
    object: Literal["session.query"] = "session.query"
    question: str
    max_tokens: int
    fast_answer: list[str] | None
    created: int
    value: str | None = Field(description="the last answer")
    confidence: float | None = Field(description="the answer's first-token logit gap")
    candidate: int | None
    data_version: int | None = Field(description="the data version the answer was computed at")
    fresh: bool = Field(description="answered on the session's current context")
    answered_at: float | None
    evaluations: int
    error: str | None


class QueryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[QueryObject]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class Timing(BaseModel):
    """Every time counts from the server's receipt of the request, before parsing."""

    ttft_ms: float
    decided_ms: float
    e2e_ms: float
    foreground_wait_ms: float = Field(description="arrival to the model's first step on it: door_ms + queue_ms")
    door_ms: float = Field(description="arrival to queued: parsing, checks, rendering, tokenising")
    queue_ms: float = Field(description="queued to the model's first step on the request")
    forwards_before_first_token: int | None = Field(
        default=None, description="model forward passes before the first token (0: answered from a cached state)"
    )


class GenerateResponse(BaseModel):
    id: str
    object: Literal["session.generation"] = "session.generation"
    created: int
    model: str
    session_id: str
    text: str
    finish_reason: str
    path: str = Field(description="ready_exact | gate | entry | session | cold")
    logit_gap: float | None
    speculative: bool = Field(description="answered from a cached distribution (the gate)")
    verified: bool | None
    candidate: int | None = Field(description="index of the chosen fast_answer candidate")
    data_version: int = Field(description="the data version the question was asked at")
    usage: Usage
    timing: Timing


class WarmResponse(BaseModel):
    object: Literal["session.warm"] = "session.warm"
    session_id: str
    status: Literal["warmed", "covered", "cancelled"]
    prompt_tokens: int
    cached_tokens: int = Field(description="tokens of the prompt the session already held")
    warmed_tokens: int = Field(description="tokens this warm computed")


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
