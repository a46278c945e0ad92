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
