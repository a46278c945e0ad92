"""Tool calls: what a request allows, how an answer is steered, and how it is read.

OpenAI clients declare functions in ``tools`` and expect the calls an answer makes in
``message.tool_calls``. The model's chat template tells it how to call (Qwen2.5's: a
JSON object inside ``<tool_call>`` tags), but models do not always do as told:
Qwen2.5-Coder-0.5B writes the bare JSON object, often inside a json code fence. The
parser accepts each of those forms; anything that does not read as calls of declared
tools stays plain content, so a malformed answer is never an error.

``tool_choice``:

- ``auto`` (the default with tools): the model decides; its answer is parsed.
- ``none``: the tools stay in the prompt (so a session's prompt, and its KV, is the same
  on every turn whatever the choice) and the answer is never parsed: no call is returned,
  even if the model writes one.
- ``required`` / a named function: the answer is steered by forcing its first tokens to
  the opening the template itself writes for a call (``<tool_call>\\n{"name": "`` for
  Qwen2.5; through ``"arguments":`` for a named function), found by rendering a call
  with placeholders. If the model still writes something that does not parse, the
  request returns what it wrote as content (finish_reason ``stop``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from headstart.session.template import ChatTemplate, Message

TAG = "<tool_call>"
END_TAG = "</tool_call>"
_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)
_CALL_KEYS = frozenset({"name", "arguments", "parameters"})
_PLACEHOLDER = "zqxplaceholderzqx"


class ToolChoiceError(ValueError):
    """``tools`` / ``tool_choice`` that cannot be honoured (the engine answers 400)."""

    def __init__(self, message: str, param: str = "tool_choice") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``arguments`` is the decoded JSON object."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        """The call as OpenAI returns it (arguments as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }

    def message(self) -> dict[str, Any]:
        """The call as chat templates expect it in an assistant message (arguments as an object)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer read for calls: ``calls`` empty means it is all content."""

    content: str | None
    calls: list[ToolCall]


@dataclass(frozen=True)
class ToolPlan:
    """What the engine does about tools for one request."""

    names: frozenset[str] = frozenset()
    parse: bool = False
    prefix: list[int] = field(default_factory=list)
    parallel: bool = True

    def read(self, text: str) -> ParsedAnswer:
        if not self.parse:
            return ParsedAnswer(text, [])
        return parse(text, self.names, parallel=self.parallel)


NO_TOOLS = ToolPlan()


def tool_names(tools: Sequence[dict[str, Any]] | None) -> list[str]:
    """Declared function names, in order; a clear error for a malformed declaration."""
    names = []
    for i, tool in enumerate(tools or ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise ToolChoiceError(f"tools[{i}] has no function name", param="tools")
        if name in names:
            raise ToolChoiceError(f"tools[{i}]: the function name {name!r} is declared twice", param="tools")
        names.append(name)
    return names


def chosen_name(tool_choice: str | dict[str, Any] | None) -> str | None:
    """The function a ``{"type": "function", "function": {"name": ...}}`` choice names."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolChoiceError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
        return name
    return None


def plan_tools(
    template: ChatTemplate,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None = None,
    *,
    parallel: bool = True,
) -> ToolPlan:
    """Validate ``tool_choice`` against ``tools`` and decide parsing and steering."""
    names = tool_names(tools)
    if not names:
        if tool_choice not in (None, "none", "auto"):
            raise ToolChoiceError("tool_choice needs tools to choose from")
        return NO_TOOLS
    named = chosen_name(tool_choice)
    if named is None and tool_choice not in (None, "auto", "none", "required"):
        raise ToolChoiceError("tool_choice is 'none', 'auto', 'required' or a named function")
    if named is not None and named not in names:
        raise ToolChoiceError(f"tool_choice names {named!r}, which is not among the declared tools")
    if tool_choice == "none":
        return ToolPlan(frozenset(names), parse=False)
    prefix: list[int] = []
    if tool_choice == "required" or named is not None:
        prefix = call_opening(template, messages, tools, names[0] if named is None else named, named is not None)
    allowed = frozenset([named]) if named is not None else frozenset(names)
    return ToolPlan(allowed, parse=True, prefix=prefix, parallel=parallel)


def call_opening(
    template: ChatTemplate,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None,
    name: str,
    through_name: bool,
) -> list[int]:
    """Tokens the template writes at the start of an answer that calls a tool: up to the
    name, or (``through_name``) through ``name`` up to its arguments. Empty when the
    template does not write calls in a way this can find.

    Found like the entry: render a call twice with different placeholders and keep what
    comes before they differ, then cut at a token boundary of the natural rendering so
    the forced tokens are the ones the model would have read there.
    """

    def answer(fn: str, args: object) -> str | None:
        call = {"id": "call_0", "type": "function", "function": {"name": fn, "arguments": args}}
        text = template.render_text([*messages, {"role": "assistant", "content": "", "tool_calls": [call]}],
                                    generation_prompt=False, tools=tools)
        return text[len(start):] if text.startswith(start) else None

    start = template.render_text(messages, generation_prompt=True, tools=tools)
    natural = answer(name, {})
    if natural is None:
        return []
    if through_name:
        other = answer(name, [])
        if other is None:
            return []
        n = 0
        while n < min(len(natural), len(other)) and natural[n] == other[n]:
            n += 1
        wanted = natural[:n]
    else:
        marked = answer(_PLACEHOLDER, {})
        at = marked.find(_PLACEHOLDER) if marked is not None else -1
        wanted = marked[:at] if marked is not None and at > 0 else ""
    if not wanted.strip() or not natural.startswith(wanted):
        return []
    ids = template.encode(natural)
    k = 0
    while k < len(ids) and wanted.startswith(template.decode(ids[: k + 1])):
        k += 1
    return ids[:k]


def _strip_fence(text: str) -> str:
    m = _FENCE.match(text.strip())
    return m.group(1).strip() if m else text.strip()


def _values(text: str) -> list[Any] | None:
    """The JSON values ``text`` holds, one after another (whitespace between); None if any
    part of it is not JSON."""
    decoder = json.JSONDecoder()
    text = _strip_fence(text)
    out, pos = [], 0
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        out.append(value)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out or None


def _call(value: Any, names: Collection[str]) -> ToolCall | None:
    if not isinstance(value, dict) or not set(value) <= _CALL_KEYS or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], args)


def _calls(text: str, names: Collection[str]) -> list[ToolCall] | None:
    values = _values(text)
    if values is None:
        return None
    calls = []
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            call = _call(item, names)
            if call is None:
                return None
            calls.append(call)
    return calls or None


def parse(text: str, names: Collection[str], *, parallel: bool = True) -> ParsedAnswer:
    """Read ``text`` as tool calls of the functions ``names``, else as content.

    Accepted: one or more ``<tool_call>`` blocks (the last may lack its closing tag),
    after optional content; or the whole answer as a JSON call object, a list of them,
    or several objects, optionally in a code fence. A call is ``{"name", "arguments"}``
    (or ``"parameters"``) naming a declared function with an object of arguments.
    """
    at = text.find(TAG)
    calls: list[ToolCall] | None = None
    content: str | None = None
    if at != -1:
        content = text[:at]
        calls = []
        for block in text[at:].split(TAG)[1:]:
            body, closed, rest = block.partition(END_TAG)
            found = _calls(body, names)
            if found is None or (closed and rest.strip()):
                calls = None
                break
            calls.extend(found)
    else:
        calls = _calls(text, names)
    if not calls:
        return ParsedAnswer(text, [])
    return ParsedAnswer(content if content and content.strip() else None, calls if parallel else calls[:1])


def _could_open_call(text: str) -> bool | None:
    """Whether streamed text so far may be the start of a call: True, False, or None
    while too little has come to say."""
    s = text.lstrip()
    if not s:
        return None
    if s.startswith((TAG, "{", "[")):
        return True
    if TAG.startswith(s):
        return None
    if s.startswith("```"):
        rest = s[3:]
        if rest[:4].lower() == "json":
            rest = rest[4:]
        elif "json".startswith(rest.lower()):
            return None
        rest = rest.lstrip()
        if not rest:
            return None
        return rest.startswith(("{", "["))
    return None if "```".startswith(s) else False


class HoldBack:
    """Holds streamed text back while it may be a tool call, so a client never sees the
    raw JSON of a call as content. Text that plainly is not a call flows through, up to
    any ``<tool_call>`` tag, after which everything is held to the end."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.held = ""
        self.passing = not active
        self.tagged = False

    def push(self, text: str) -> str:
        """Add streamed text; return what may be sent now."""
        if not self.active:
            return text
        self.held += text
        if not self.passing and not self.tagged:
            verdict = _could_open_call(self.held)
            if verdict is None:
                return ""
            if verdict:
                self.tagged = True  # hold everything to the end
                return ""
            self.passing = True
        if self.tagged:
            return ""
        at = self.held.find(TAG)
        if at != -1:
            out, self.held, self.tagged = self.held[:at], self.held[at:], True
            return out
        keep = next((k for k in range(min(len(TAG) - 1, len(self.held)), 0, -1) if TAG.startswith(self.held[-k:])), 0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        return out

    def finish(self, calls: bool) -> str:
        """What is left to send once the answer is read: nothing when it held calls."""
        out, self.held = ("" if calls else self.held), ""
        return out
