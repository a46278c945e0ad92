"""Every request and response body of the HTTP door, validated with pydantic.

The OpenAI door: fields we support are checked strictly, with OpenAI's ranges, so a bad
value is a 400 naming the field. A field that would change what the answer must be and that
headstart does not implement is refused with a 400 naming it (``REFUSED``); advisory fields
that never change an answer are accepted (``ADVISORY``); any other field is accepted, named
in the answer's ``headstart.ignored_fields`` and logged once, as vLLM warns.

The sessions API (below): our own endpoints refuse unknown fields (a typo should be a 400
naming the field, not a silently ignored setting); a few names of the closest product's API
are accepted as aliases. The response models are what the door serialises through, so the
OpenAPI schema it serves is the shape clients really get.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from headstart.config import MIN_WINDOW, QUERY_MAX_TOKENS
from headstart.decode.grammar import schema_text, strict_problem
from headstart.decode.sampling import Constraint, SamplingParams
from headstart.engine.engine import Request
from headstart.errors import BadRequest

log = logging.getLogger("headstart.server")

DEFAULT_MAX_TOKENS = 256

# Fields that by OpenAI's definition never change the answer's content.
ADVISORY = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
                      "prediction"})
# Fields that would change what the answer must be, and why headstart refuses them.
REFUSED: dict[str, str] = {
    "audio": "audio output is not supported: this server writes text only",
    "functions": "the deprecated `functions` field is not supported: declare them in `tools`",
    "function_call": "the deprecated `function_call` field is not supported: use `tool_choice`",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "the served models do not reason in a separate channel",
    "verbosity": "the served models have no verbosity control",
    # vLLM's extensions that headstart does not implement
    "best_of": "best_of is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "beam search is not supported",
    "min_tokens": "min_tokens is not supported",
    "ignore_eos": "ignore_eos is not supported",
    "stop_token_ids": "stop_token_ids is not supported: use `stop` strings",
    "bad_words": "bad_words is not supported: use `logit_bias`",
    "allowed_token_ids": "allowed_token_ids is not supported: use `logit_bias`",
    "prompt_logprobs": "prompt_logprobs is not supported",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported",
    "skip_special_tokens": "skip_special_tokens is not supported",
    "spaces_between_special_tokens": "spaces_between_special_tokens is not supported",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported",
    "guided_json": "use `response_format` with a json_schema",
    "guided_regex": "regular-expression constraints are not supported",
    "guided_choice": "use `response_format` with a json_schema enum",
    "guided_grammar": "grammar constraints are not supported: use `response_format`",
    "guided_decoding_backend": "use `response_format`",
    "structured_outputs": "use `response_format`",
    "chat_template": "the model's own chat template is always used",
    "chat_template_kwargs": "the model's own chat template is always used",
    "add_generation_prompt": "the generation prompt is always added",
    "continue_final_message": "continuing the final message is not supported",
    "documents": "documents are not supported: put them in the messages",
}
_warned: set[str] = set()
_warned_lock = threading.Lock()


def unsupported(name: str, why: str) -> BadRequest:
    """A refusal in the shape OpenAI gives an unsupported parameter."""
    error = BadRequest(f"Unsupported parameter: '{name}' is not supported by headstart ({why}).", param=name)
    error.code = "unsupported_parameter"  # type: ignore[attr-defined]
    return error


def ignored_fields(extra: dict[str, Any] | None) -> list[str]:
    """Refuse what must not be ignored; the names of the rest (logged once each)."""
    names = sorted(extra or {})
    for name in names:
        if name in REFUSED:
            raise unsupported(name, REFUSED[name])
    ignored = [name for name in names if name not in ADVISORY]
    with _warned_lock:
        new = [name for name in ignored if name not in _warned]
        _warned.update(new)
    for name in new:
        log.warning("request field %r is not an OpenAI field headstart knows; it is ignored", name)
    return ignored


_PART_KINDS = {"image_url": "image", "input_audio": "audio", "file": "file", "refusal": "refusal"}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


def _content(value: Any) -> Any:
    """Text, text parts or nothing; a clear word for anything else (images above all)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(f"content must be a string, a list of text parts, or null, not {type(value).__name__}")
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _PART_KINDS:
            raise ValueError(f"part {j} is of type {kind!r}: {_PART_KINDS[kind]} input is not supported, "
                             "the served models read text only")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f'part {j} must be {{"type": "text", "text": "..."}}')
    return value


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict[str, Any] = ""

    def to_template(self) -> dict[str, Any]:
        """Arguments as an object: templates write them with ``tojson``, and a JSON string
        would come out quoted, unlike the call the model wrote."""
        args: Any = self.arguments
        if isinstance(args, str):
            try:
                decoded = json.loads(args) if args.strip() else {}
            except ValueError:
                decoded = None
            args = decoded if isinstance(decoded, dict) else args
        return {"name": self.name, "arguments": args}


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        return _content(value)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_message(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message can carry tool_calls")
        return self

    def to_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content or "",
        }
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": c.function.to_template()} for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition

    def to_template(self) -> dict[str, Any]:
        """The declaration the chat template writes into the prompt (``strict`` is ours)."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True, exclude={"strict"})}


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON under a schema
    (enforced by constrained decoding whether ``strict`` is set or not)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response_format needs its json_schema: {name, schema, strict}")
        if self.json_schema is not None and self.json_schema.strict:
            problem = strict_problem(self.json_schema.schema_ or {})
            if problem is not None:
                raise ValueError(f"strict: {problem}")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint("json_object")
        if self.type == "json_schema" and self.json_schema is not None:
            return Constraint("json_schema", schema_text(self.json_schema.schema_ or {}))
        return None


class SamplingFields(BaseModel):
    """Fields shared by every request that generates."""

    model_config = ConfigDict(extra="allow")
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=100.0)
    response_format: ResponseFormat | None = None
    # headstart extensions
    gate: bool | None = None
    gap_threshold: float | None = Field(default=None, ge=0.0)
    fast_answer: list[str] | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (integers as strings), not {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} must be between -100 and 100, not {bias}")
        if value is not None and len(value) > 1024:
            raise ValueError("at most 1024 biased tokens")
        return value

    @field_validator("fast_answer")
    @classmethod
    def _fast_answer(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not c for c in value):
            raise ValueError("candidates must be non-empty strings")
        return value

    def sampling(self, default_temperature: float, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items())),
            constraint=self.response_format.constraint() if self.response_format is not None else None,
            **self.output_fields(),
        )

    def output_fields(self) -> dict[str, Any]:
        """What a door adds to the parameters (log-probabilities, a format)."""
        return {}


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    modalities: list[Literal["text"]] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities(cls, value: Any) -> Any:
        if isinstance(value, list) and any(m != "text" for m in value):
            raise ValueError("only the 'text' modality is supported: the served models write text only")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    def output_fields(self) -> dict[str, Any]:
        return {"logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs or 0}

    def ignored(self) -> list[str]:
        """Unknown fields this answer does not honour (refusing those it must not ignore)."""
        return ignored_fields(self.model_extra)

    def to_engine(self, session_id: str | None, owner: str | None, default_temperature: float) -> Request:
        return Request(
            messages=[m.to_template() for m in self.messages],
            params=self.sampling(default_temperature),
            session_id=session_id,
            owner=owner,
            tools=[t.to_template() for t in self.tools] if self.tools else None,
            tool_choice=self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice)
            else self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls is not False,
            strict_tools=frozenset(t.function.name for t in self.tools or () if t.function.strict),
            gate=self.gate,
            gap_threshold=self.gap_threshold,
            fast_answer=self.fast_answer,
            n=self.n or 1,
            stream=self.stream,  # only a streamed answer may come from the gate
        )


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: one prompt, as text or token ids, continued as it stands."""

    model: str | None = None
    prompt: str | list[int]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            if len(value) == 1:
                return value[0]
            raise ValueError("one prompt per request: send each prompt as its own request")
        if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
            raise ValueError("one prompt per request: send each list of token ids as its own request")
        if isinstance(value, list | str) and not value:
            raise ValueError("the prompt is empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("insertion (a suffix) is not supported: the served models only continue a prompt")
        return value

    @field_validator("logprobs")
    @classmethod
    def _echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError("echo with logprobs would need the prompt's log-probabilities, which headstart "
                             "does not compute; ask for one or the other")
        return value

    def output_fields(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs is not None, "top_logprobs": self.logprobs or 0}

    def ignored(self) -> list[str]:
        return ignored_fields(self.model_extra)

    def to_engine(
        self, prompt_ids: list[int], session_id: str | None, owner: str | None, default_temperature: float
    ) -> Request:
        return Request(
            messages=[],
            prompt_ids=prompt_ids,
            params=self.sampling(default_temperature, default_max_tokens=16),  # OpenAI's default here
            session_id=session_id,
            owner=owner,
            gate=False,  # ready positions are chat turns'; a raw prompt is served exactly
            gap_threshold=self.gap_threshold,
            fast_answer=self.fast_answer,
            n=self.n or 1,
            stream=self.stream,
        )


# -- the sessions API ------------------------------------------------------------------------

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
    max_tokens: int = Field(default=QUERY_MAX_TOKENS, ge=1, le=32, description="tokens of the answer kept")
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
