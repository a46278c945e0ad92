"""Tool calls through the OpenAI door, driven by the official client on a real server:
the second model for calls, the tiny model for refusals that need no model work."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI

from headstart.engine.engine import Engine, EngineConfig
from headstart.model import HFBackend
from headstart.server.app import ServerConfig, create_app
from tests.conftest import LiveServer

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_server(qwen: HFBackend):
    config = EngineConfig(gate=False, continuation_cap=6, forced_cap=4)
    app = create_app(ServerConfig(), factory=lambda: Engine(qwen, config=config))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def tiny_server(tiny: HFBackend):
    app = create_app(ServerConfig(), factory=lambda: Engine(tiny, config=EngineConfig(pre_position=False)))
    with LiveServer(app) as live:
        yield live


def _client(server: LiveServer, session: str | None = None) -> OpenAI:
    headers = {"x-session-id": session} if session else {}
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", default_headers=headers, max_retries=0)


def _stream(client: OpenAI, **kwargs: Any) -> tuple[str, list[dict[str, Any]], str | None, dict[str, Any]]:
    """Content, tool calls assembled from ``delta.tool_calls`` as OpenAI clients do, the
    finish reason and the headstart extension of a streamed answer."""
    content, calls, finish, extension = "", {}, None, {}
    for chunk in client.chat.completions.create(stream=True, temperature=0, **kwargs):
        extension = chunk.model_extra.get("headstart") or extension
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        content += choice.delta.content or ""
        for part in choice.delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], finish, extension


def test_a_tool_call_its_result_and_the_answer_through_a_session_equal_cold(qwen_server: LiveServer) -> None:
    session, plain = _client(qwen_server, "agent"), _client(qwen_server)
    model = "qwen2.5-coder-0.5b"
    r = session.chat.completions.create(model=model, messages=QUESTION, tools=WEATHER, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert "paris" in json.dumps(args).lower()
    assert r.model_extra["headstart"]["path"] == "cold"

    # the same turn with no session, streamed: the same call, sent as delta.tool_calls
    content, calls, finish, _ = _stream(plain, model=model, messages=QUESTION, tools=WEATHER, max_tokens=40)
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", args)]
    assert calls[0]["id"].startswith("call_")

    # the result goes back in; the session has pre-paid the entry of the `tool` message
    qwen_server.server.config.app.state.headstart.engine.wait_idle(300)
    messages = [
        *QUESTION,
        choice.message,  # the client's own message object, sent back as the README shows
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 18, "sky": "cloudy"})},
    ]
    answer = session.chat.completions.create(
        model=model, messages=messages, tools=WEATHER, temperature=0, max_tokens=16
    )
    headstart = answer.model_extra["headstart"]
    assert headstart["path"] in ("entry", "ready_exact")
    assert answer.usage.prompt_tokens_details.cached_tokens > r.usage.prompt_tokens
    reply = answer.choices[0].message
    assert reply.content or reply.tool_calls
    content, calls, finish, extension = _stream(plain, model=model, messages=messages, tools=WEATHER, max_tokens=16)
    assert extension["path"] == "cold" and finish == answer.choices[0].finish_reason
    assert content == (reply.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in reply.tool_calls or ()
    ]


def test_an_answer_cut_short_comes_back_as_content(qwen_server: LiveServer) -> None:
    """Output that does not parse as a call (here: cut by max_tokens) is plain content,
    streamed in full once it is known not to be a call; never an error."""
    client = _client(qwen_server)
    r = client.chat.completions.create(
        model="qwen2.5-coder-0.5b", messages=QUESTION, tools=WEATHER, temperature=0, max_tokens=5
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content
    content, calls, finish, _ = _stream(client, model="qwen2.5-coder-0.5b", messages=QUESTION, tools=WEATHER,
                                        max_tokens=5)
    assert (content, calls, finish) == (r.choices[0].message.content, [], "length")


def test_tool_choice_naming_an_undeclared_function_is_a_400(qwen_server: LiveServer) -> None:
    with pytest.raises(BadRequestError) as info:
        _client(qwen_server).chat.completions.create(
            model="qwen2.5-coder-0.5b", messages=QUESTION, tools=WEATHER, max_tokens=4,
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}},
        )
    assert info.value.body["param"] == "tool_choice" and "launch_rockets" in info.value.body["message"]


def test_a_model_without_tool_support_answers_tools_with_a_clear_400(tiny_server: LiveServer) -> None:
    client = _client(tiny_server)
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", messages=QUESTION, tools=WEATHER, max_tokens=4)
    assert info.value.body["param"] == "tools"
    assert "no tool support" in info.value.body["message"] and "qwen2.5-coder-0.5b" in info.value.body["message"]
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", messages=QUESTION, tool_choice="required", max_tokens=4)
    assert info.value.body["param"] == "tool_choice"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0]"),
        ({"messages": QUESTION, "tools": []}, "tools"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "no spaces"}}]},
         "tools[0].function.name"),
        ({"messages": QUESTION, "tools": WEATHER, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_malformed_tool_fields_are_400s_naming_the_field(tiny_server: LiveServer, body: dict, param: str) -> None:
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", json={"max_tokens": 4, **body}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith(param)


# Strict functions (OpenAI's `strict` function calling): required fields, enums, a nested object.
UNIT = {"type": "string", "enum": ["celsius", "fahrenheit"]}
STRICT = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": UNIT},
                       "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book_flight", "description": "Book a flight for a passenger", "strict": True,
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string"}, "destination": {"type": "string"},
            "passenger": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                          "required": ["name", "age"], "additionalProperties": False}},
            "required": ["origin", "destination", "passenger"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in STRICT}
FLIGHT = [{"role": "user", "content": "Book a flight from Oslo to Rome for Ann, who is 34."}]
JOKE = [{"role": "user", "content": "Tell me a joke."}]


def _valid_calls(calls: list[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    """Each call's arguments parsed and validated against its function's schema."""
    import jsonschema

    out = []
    for name, arguments in calls:
        args = json.loads(arguments)
        jsonschema.validate(args, SCHEMAS[name])
        out.append((name, args))
    return out


def test_strict_calls_follow_their_schemas_and_tool_choice(qwen_server: LiveServer) -> None:
    """required always yields a call, even to a question no tool answers; a named choice
    calls that function; auto with strict tools calls validly. Streamed and not."""
    client, model = _client(qwen_server), "qwen2.5-coder-0.5b"
    content, calls, finish, _ = _stream(client, model=model, messages=JOKE, tools=STRICT, max_tokens=40,
                                        tool_choice="required")  # no tool tells jokes: a call all the same
    assert (content, finish) == ("", "tool_calls") and len(calls) == 1
    _valid_calls([(c["name"], c["arguments"]) for c in calls])
    cases = [
        (FLIGHT, {"type": "function", "function": {"name": "book_flight"}}, 60),
        (QUESTION, "auto", 48),  # the model writes a bare fenced call here: validated after the fact
    ]
    for messages, choice, max_tokens in cases:
        r = client.chat.completions.create(model=model, messages=messages, tools=STRICT, tool_choice=choice,
                                           temperature=0, max_tokens=max_tokens)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls, (choice, message)
        valid = _valid_calls([(c.function.name, c.function.arguments) for c in message.tool_calls])
        if isinstance(choice, dict):
            assert [n for n, _ in valid] == ["book_flight"]
            assert valid[0][1]["passenger"]["age"] == 34
        if messages is QUESTION:
            assert valid == [("get_weather", {"city": "Paris", "unit": valid[0][1]["unit"]})]


def test_a_constrained_session_turn_with_tools_equals_the_same_turn_cold(qwen_server: LiveServer) -> None:
    """Turn 2 of a session (the tool's result in, a named call's grammar in force) comes from
    the session's KV and equals the same request cold, streamed."""
    session, plain, model = _client(qwen_server, "strict-agent"), _client(qwen_server), "qwen2.5-coder-0.5b"
    first = session.chat.completions.create(model=model, messages=QUESTION, tools=STRICT, tool_choice="required",
                                            temperature=0, max_tokens=40)
    (call,) = first.choices[0].message.tool_calls
    messages = [*QUESTION, first.choices[0].message,
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 18})}]
    qwen_server.server.config.app.state.headstart.engine.wait_idle(300)
    kwargs = {"model": model, "messages": messages, "tools": STRICT, "max_tokens": 32,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    warm = session.chat.completions.create(temperature=0, **kwargs)
    assert warm.model_extra["headstart"]["path"] in ("entry", "ready_exact")
    assert warm.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    content, calls, finish, extension = _stream(plain, **kwargs)
    assert extension["path"] == "cold" and finish == warm.choices[0].finish_reason == "tool_calls"
    reply = warm.choices[0].message
    assert content == "" and reply.content is None
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments)
                                                            for c in reply.tool_calls]
    assert [n for n, _ in _valid_calls([(c.function.name, c.function.arguments) for c in reply.tool_calls])] == [
        "get_weather"]


@pytest.mark.parametrize(
    ("tools", "choice", "param", "words"),
    [
        ([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "nonsense"}}}}}], None, "tools[0].function.parameters",
         "cannot be compiled"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
         "tools[0].function.parameters", "object"),
        ([*STRICT, {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}}}], None,
         "tools[2].function.parameters", "properties.a.not"),
        (STRICT, {"type": "function", "function": {"name": "launch_rockets"}}, "tool_choice", "launch_rockets"),
    ],
)
def test_tool_schemas_and_choices_it_cannot_honour_are_400s(
    qwen_server: LiveServer, tools: list, choice: Any, param: str, words: str
) -> None:
    body = {"messages": QUESTION, "tools": tools, "max_tokens": 4, **({"tool_choice": choice} if choice else {})}
    r = httpx.post(f"{qwen_server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
