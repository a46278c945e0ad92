"""Tool calls: what a request allows, how an answer is held to it, and how it is read.

OpenAI clients declare functions in ``tools`` and expect the calls an answer makes in
``message.tool_calls``. The model's chat template tells it how to call (Qwen2.5's: a
JSON object inside ``<tool_call>`` tags), but models do not always do as told:
Qwen2.5-Coder-0.5B writes the bare JSON object, often inside a json code fence. The
parser accepts each of those forms; anything that does not read as calls of declared
tools stays plain content, so a malformed answer is never an error.

Where a call must be valid, a grammar holds the answer to it (grammar.py, xgrammar): the
call envelope the template writes (found by rendering a call with placeholders), the
function's name among those allowed, and its arguments under the function's JSON schema.

``tool_choice``:

- ``auto`` (the default with tools): the model decides; its answer is parsed. When a
  function is declared ``strict``, a grammar with a trigger lets the answer be free text,
  but once it opens the template's envelope the call must be complete and its arguments
  valid; a call it writes in another form (bare JSON) is kept as a call only if the
  arguments of each strict function validate against its schema, else it is content.
  Without a strict function nothing is constrained (OpenAI's non-strict calls are best
  effort too).
- ``none``: the tools stay in the prompt (so a session's prompt, and its KV, is the same
  on every turn whatever the choice) and the answer is never parsed: no call is returned,
  even if the model writes one.
- ``required`` / a named function: the grammar admits one or more calls (one call of the
  named function) and nothing else, every function's arguments under its schema, strict
  or not. A call cut by ``max_tokens`` comes back as content (finish_reason ``length``).

Every declared schema must compile (a bad one is a 400 naming it); a strict one may use
only keywords the grammar enforces (grammar.strict_problem).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from headstart.decode.grammar import GrammarError, json_grammar
from headstart.decode.sampling import Constraint
from headstart.session.template import ChatTemplate, Message

TAG = "<tool_call>"
END_TAG = "</tool_call>"
_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)
_CALL_KEYS = frozenset({"name", "arguments", "parameters"})
_PLACEHOLDER = "zqxplaceholderzqx"
_OTHER = "zqxotherzqx"


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
class Envelope:
    """How the template writes a call: ``begin + name + middle + arguments + end``, calls
    joined by ``separator``; ``trigger`` opens a call where free text may come first."""

    begin: str
    middle: str
    end: str
    separator: str

    @property
    def trigger(self) -> str:
        word = re.match(r"\s*\S+", self.begin)
        return word.group(0) if word else self.begin

    def write(self, name: str, arguments: str) -> str:
        return f"{self.begin}{name}{self.middle}{arguments}{self.end}"


BARE = Envelope('{"name": "', '", "arguments": ', "}", "\n")  # for a template whose envelope is not found


@dataclass(frozen=True)
class ToolPlan:
    """What the engine does about tools for one request: which calls are read from the
    answer, the grammar that holds it (None: unconstrained) and the schemas a call of a
    strict function must validate against when the grammar did not make it."""

    names: frozenset[str] = frozenset()
    parse: bool = False
    parallel: bool = True
    constraint: Constraint | None = None
    strict: tuple[tuple[str, str], ...] = ()  # (name, schema text) of the strict functions

    def read(self, text: str) -> ParsedAnswer:
        if not self.parse:
            return ParsedAnswer(text, [])
        answer = parse(text, self.names, parallel=self.parallel)
        if self.strict and answer.calls:
            import jsonschema

            schemas = {name: json.loads(schema) for name, schema in self.strict}
            for call in answer.calls:
                if call.name in schemas and not jsonschema.Draft202012Validator(schemas[call.name]).is_valid(
                    call.arguments
                ):
                    return ParsedAnswer(text, [])
        return answer


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
    tools: Sequence[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None = None,
    *,
    parallel: bool = True,
    strict: Collection[str] = (),
) -> ToolPlan:
    """Validate ``tools`` (their schemas; ``strict``: the functions declared strict) and
    ``tool_choice``, and decide parsing and the grammar."""
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
    unknown = sorted(set(strict) - set(names))
    if unknown:
        raise ToolChoiceError(f"strict names undeclared functions: {', '.join(unknown)}", param="tools")
    schemas = argument_schemas(tools or (), strict)
    if tool_choice == "none":
        return ToolPlan(frozenset(names), parse=False)
    strict_schemas = tuple((n, json.dumps(schemas[n][0])) for n in names if n in strict)
    allowed = [named] if named is not None else names
    if tool_choice == "required" or named is not None:
        constraint = call_grammar(envelope(template, tools), {n: schemas[n][1] for n in allowed},
                                  "named" if named is not None else "required", parallel)
    elif strict_schemas:
        constraint = call_grammar(envelope(template, tools), {n: g for n, (_, g) in schemas.items()}, "auto",
                                  parallel)
    else:
        constraint = None
    return ToolPlan(frozenset(allowed), parse=True, parallel=parallel, constraint=constraint,
                    strict=strict_schemas)


def argument_schemas(
    tools: Sequence[dict[str, Any]], strict: Collection[str]
) -> dict[str, tuple[dict[str, Any], str]]:
    """Each function's arguments schema (an object; none declared: any object) and its
    grammar: a schema that does not compile, or a strict one the grammar cannot fully
    enforce, is refused naming its field."""
    out = {}
    for i, tool in enumerate(tools):
        fn = tool["function"]
        param = f"tools[{i}].function.parameters"
        schema = fn.get("parameters")
        if schema is None:
            schema = {}
        if not isinstance(schema, dict):
            raise ToolChoiceError("parameters must be a JSON Schema object", param=param)
        if schema.get("type", "object") != "object":
            raise ToolChoiceError("parameters must describe an object (\"type\": \"object\")", param=param)
        schema = {"type": "object", **schema}
        try:
            out[fn["name"]] = schema, json_grammar(schema, strict=fn["name"] in strict, param=param)
        except GrammarError as exc:
            raise ToolChoiceError(str(exc), param=exc.param) from exc
    return out


def call_grammar(env: Envelope, grammars: dict[str, str], mode: str, parallel: bool) -> Constraint:
    """The structural tag for calls of ``grammars``' functions (their arguments' EBNF) in
    ``env``: ``named``, one call;
    ``required``, one or more calls and nothing else; ``auto``, free text in which a call,
    once opened by the envelope's trigger, must be complete and valid."""
    tags = [
        {"type": "tag", "begin": f"{env.begin}{name}{env.middle}",
         "content": {"type": "grammar", "grammar": grammar}, "end": env.end}
        for name, grammar in grammars.items()
    ]
    if mode == "named":
        fmt: dict[str, Any] = tags[0]
    elif mode == "required":
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": env.separator, "at_least_one": True,
               "stop_after_first": not parallel}
    else:
        fmt = {"type": "triggered_tags", "triggers": [env.trigger], "tags": tags, "stop_after_first": not parallel}
    return Constraint("tool_calls", json.dumps({"type": "structural_tag", "format": fmt}))


def envelope(template: ChatTemplate, tools: Sequence[dict[str, Any]] | None) -> Envelope:
    """The call envelope the template writes, found like the entry: render an answer with
    placeholder calls and keep what surrounds them. A template whose envelope this cannot
    find, or whose calls the parser would not read back, gets the bare JSON object the
    parser reads.
    """
    question: list[Message] = [{"role": "user", "content": "."}]
    start = template.render_text(question, generation_prompt=True, tools=tools)

    def answer(*calls: tuple[str, object]) -> str:
        tool_calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                      for i, (n, a) in enumerate(calls)]
        text = template.render_text([*question, {"role": "assistant", "content": "", "tool_calls": tool_calls}],
                                    generation_prompt=False, tools=tools)
        return text[len(start):] if text.startswith(start) else ""

    obj, arr = answer((_PLACEHOLDER, {})), answer((_PLACEHOLDER, []))
    n = 0
    while n < min(len(obj), len(arr)) and obj[n] == arr[n]:
        n += 1
    k = 0
    while k < min(len(obj), len(arr)) - n and obj[-1 - k] == arr[-1 - k]:
        k += 1
    head, tail = obj[:n], obj[len(obj) - k:]
    end_text = template.decode([template.end_of_message])
    if end_text and end_text in tail:
        tail = tail[: tail.index(end_text)]
    begin, _, middle = head.partition(_PLACEHOLDER)
    env = Envelope(begin, middle, tail, "\n")
    two = answer((_PLACEHOLDER, {}), (_OTHER, {}))
    first = env.write(_PLACEHOLDER, "{}")
    second = two.find(f"{begin}{_OTHER}", len(first))
    if two.startswith(first) and second != -1:
        env = Envelope(begin, middle, tail, two[len(first):second])
    sample = [("f", {"a": 1}), ("g", {})]
    text = env.separator.join(env.write(name, json.dumps(args)) for name, args in sample)
    readable = [(c.name, c.arguments) for c in parse(text, {"f", "g"}).calls] == sample
    return env if begin.strip() and _PLACEHOLDER in head and readable else BARE


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
