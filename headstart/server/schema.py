"""Request bodies of the OpenAI door, validated with pydantic.

Unknown OpenAI fields are accepted and ignored (clients send many); fields we support
are checked strictly so a bad value is a 400 naming the field, never a surprise later.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from headstart.engine import Request
from headstart.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


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


class SamplingFields(BaseModel):
    """Fields shared by every request that generates."""

    model_config = ConfigDict(extra="allow")
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
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

    @field_validator("fast_answer")
    @classmethod
    def _fast_answer(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not c for c in value):
            raise ValueError("candidates must be non-empty strings")
        return value

    def sampling(self, default_temperature: float) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
        )


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

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
            gate=self.gate,
            gap_threshold=self.gap_threshold,
            fast_answer=self.fast_answer,
            stream=self.stream,  # only a streamed answer may come from the gate
        )
