"""The OpenAI door on a real server on loopback, driven by the official client."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from openai import OpenAI

from headstart.engine.engine import Engine, EngineConfig
from headstart.model import HFBackend
from headstart.server.app import ServerConfig, create_app
from tests.conftest import LiveServer

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which one is larger?"]


@pytest.fixture(scope="module")
def server(real: HFBackend):
    """The default settings: the guaranteed gate, closed on a fresh server."""
    app = create_app(ServerConfig(), factory=lambda: Engine(real, config=EngineConfig()))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def forced(real: HFBackend):
    """``--gap-threshold 0``: a fixed threshold with no guarantee, so the gate fires wherever
    a turn meets a ready position."""
    app = create_app(ServerConfig(), factory=lambda: Engine(real, config=EngineConfig(gap_threshold=0.0)))
    with LiveServer(app) as live:
        yield live


def _client(server: LiveServer, session: str | None) -> OpenAI:
    headers = {"x-session-id": session} if session else {}
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", default_headers=headers, max_retries=0)


def _wait_idle(server: LiveServer) -> None:
    server.server.config.app.state.headstart.engine.wait_idle(300)


def _turn(client: OpenAI, messages: list[dict[str, str]], stream: bool) -> tuple[str, dict, int]:
    """One answer through the official client: its text, ``headstart`` object, cached tokens."""
    if not stream:
        r = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=12)
        assert r.choices[0].finish_reason in ("stop", "length")
        usage = r.usage.prompt_tokens_details.cached_tokens
        return r.choices[0].message.content or "", r.model_extra["headstart"], usage
    text, last = "", None
    for chunk in client.chat.completions.create(
        model="smollm2-135m", messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        last = chunk
    assert last is not None and last.usage is not None
    return text, last.model_extra["headstart"], last.usage.prompt_tokens_details.cached_tokens


def _converse(server: LiveServer, session: str, stream: bool) -> list[tuple[str, dict, int, str]]:
    """The questions as turns of one session; each with the answer a one-off request (no
    session, so no gate) gives to the same messages."""
    client, one_off = _client(server, session), _client(server, None)
    messages: list[dict[str, str]] = []
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        text, extension, cached = _turn(client, messages, stream)
        cold_text, cold_ext, _ = _turn(one_off, messages, False)
        assert cold_ext["path"] == "cold" and cold_ext["verified"] is None
        assert extension["session_id"] == session and extension["ttft_ms"] > 0
        turns.append((text, extension, cached, cold_text))
        messages.append({"role": "assistant", "content": text})
        _wait_idle(server)
    paths = [t[1]["path"] for t in turns]
    cached = [t[2] for t in turns]
    assert paths[0] == "cold" and cached[0] == 0
    assert cached[1] > 0 and cached[2] > cached[1]
    assert all(p in ("ready_exact", "gate", "entry", "session") for p in paths[1:])
    return turns


@pytest.mark.parametrize("stream", [False, True])
def test_with_the_default_settings_every_turn_equals_a_one_off(server: LiveServer, stream: bool) -> None:
    """Out of the box the gate is closed (no evidence yet): a session changes what a turn
    costs, never what it answers, streamed or not."""
    session = f"default-{stream}"
    for text, extension, _, cold_text in _converse(server, session, stream):
        assert extension["path"] != "gate" and extension["verified"] is None and not extension["speculative"]
        assert text == cold_text
    gate = httpx.get(f"{server.url}/v1/sessions/{session}", timeout=30).json()["gate"]
    assert gate["open"] is False and "too little evidence" in gate["reason"]
    assert gate["keys"][f"session:{session}"]["n"] >= 1  # the shadow checks are its evidence


def test_a_non_streamed_answer_never_comes_from_the_gate(forced: LiveServer) -> None:
    """Even with the gate forced open, a client that waits for the whole answer gets the
    exact one: the gate would save it nothing."""
    for text, extension, _, cold_text in _converse(forced, "forced-whole", False):
        assert extension["path"] != "gate" and extension["verified"] is None
        assert text == cold_text


def test_a_streamed_answer_differs_only_through_the_gate_and_says_so(forced: LiveServer) -> None:
    """With the gate forced open, a streamed turn that met a ready position is answered by
    the gate; its last chunk says whether the first token was verified. A verified answer
    is the cold one (the rest is decoded on the real state); every other path is exact."""
    turns = _converse(forced, "forced-stream", True)
    gated = [t for t in turns if t[1]["path"] == "gate"]
    assert gated, "a ready position was met: the forced gate must answer"
    for text, extension, _, cold_text in turns:
        if extension["path"] == "gate":
            assert extension["speculative"] is True and isinstance(extension["verified"], bool)
            if extension["verified"]:
                assert text == cold_text
        else:
            assert extension["verified"] is None and text == cold_text


def test_stream_is_sse_and_ends_with_done(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert '"headstart"' in lines[-2]


def test_second_request_on_a_busy_session_is_409(server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "Count from one to fifty."}], "max_tokens": 40,
            "temperature": 0}
    headers = {"x-session-id": "busy"}
    first: dict[str, object] = {}

    def run() -> None:
        first["r"] = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)

    t = threading.Thread(target=run)
    t.start()
    engine = server.server.config.app.state.headstart.engine
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(s.id == "busy" and s.busy for s in engine.list_sessions()):
        time.sleep(0.01)
    second = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    t.join()
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "session_busy"
    assert first["r"].status_code == 200  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi " * 9000}]}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(server: LiveServer, body: object, status: int, param: str | None) -> None:
    if isinstance(body, bytes):
        r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60)
    else:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


def test_health_is_503_while_the_model_loads() -> None:
    release = threading.Event()

    def slow_factory() -> Engine:
        release.wait(30)
        raise RuntimeError("no model in this test")

    app = create_app(ServerConfig(), factory=slow_factory)
    live = LiveServer(app)
    live.thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{live.url}/health", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        chat = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_loading"
        release.set()
        deadline = time.monotonic() + 30  # until the failed load is reported
        while (r := httpx.get(f"{live.url}/health", timeout=2)).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert r.status_code == 503 and r.json()["status"] == "error"
    finally:
        release.set()
        live.__exit__(None, None, None)
