"""The OpenAI door on a real server on loopback, driven by the official client."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from openai import OpenAI

from headstart.engine import Engine, EngineConfig
from headstart.model import HFBackend
from headstart.server.app import ServerConfig, create_app
from tests.conftest import LiveServer

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which one is larger?"]


@pytest.fixture(scope="module")
def server(real: HFBackend):
    app = create_app(ServerConfig(), factory=lambda: Engine(real, config=EngineConfig()))
    with LiveServer(app) as live:
        yield live


def _client(server: LiveServer, session: str | None) -> OpenAI:
    headers = {"x-session-id": session} if session else {}
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", default_headers=headers, max_retries=0)


def _wait_idle(server: LiveServer) -> None:
    server.server.config.app.state.headstart.engine.wait_idle(300)


@pytest.mark.parametrize("stream", [False, True])
def test_three_turns_through_a_session(server: LiveServer, stream: bool) -> None:
    client = _client(server, f"openai-{stream}")
    messages: list[dict[str, str]] = []
    paths, cached, texts = [], [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        if stream:
            text, last = "", None
            for chunk in client.chat.completions.create(
                model="smollm2-135m", messages=messages, temperature=0, max_tokens=12, stream=True,
                stream_options={"include_usage": True},
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                last = chunk
            assert last is not None and last.usage is not None
            extension = last.model_extra["headstart"]
            cached.append(last.usage.prompt_tokens_details.cached_tokens)
        else:
            r = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=12)
            text = r.choices[0].message.content
            extension = r.model_extra["headstart"]
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
            assert r.choices[0].finish_reason in ("stop", "length")
        assert extension["session_id"] == f"openai-{stream}"
        assert extension["ttft_ms"] > 0
        paths.append(extension["path"])
        texts.append(text)
        messages.append({"role": "assistant", "content": text})
        _wait_idle(server)
    assert paths[0] == "cold" and cached[0] == 0
    assert cached[1] > 0 and cached[2] > cached[1]
    assert all(p in ("ready_exact", "gate", "entry", "session") for p in paths[1:])
    # Every turn: a one-off request (no session) gives the same greedy answer to the same
    # conversation whenever the session took an exact path.
    one_off = _client(server, None)
    for turn, (path, text) in enumerate(zip(paths, texts, strict=True)):
        prompt = messages[: 2 * turn + 1]
        cold = one_off.chat.completions.create(model="smollm2-135m", messages=prompt, temperature=0, max_tokens=12)
        assert cold.model_extra["headstart"]["path"] == "cold"
        if path != "gate":
            assert cold.choices[0].message.content == text, (turn, path)


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
