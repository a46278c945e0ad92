"""Replicas on a real Ray Serve (2 replicas of the default model behind Serve's HTTP proxy
on loopback) sharing a real PostgreSQL store: sessions stay on their replica, answers equal
a cold computation, and a killed replica's sessions go on, exactly, on another replica.

The replicas reserve no CPUs (``num_cpus=0``), Ray runs without a dashboard and with a
small object store, so the cluster fits the CI machine beside the rest of the suite. The
kill test runs last: it changes the replica set.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from headstart.bench.serverproc import free_port
from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.model import HFBackend
from headstart.scaleout.app import ACTOR_PREFIX, REPLICA_HEADER, build_app, live_replicas
from headstart.scaleout.run import deploy, start_ray
from tests.conftest import pg_database
from tests.helpers import QUESTIONS

pytestmark = pytest.mark.real
PARAMS = SamplingParams(max_tokens=10)


@dataclass
class Cluster:
    url: str
    client: OpenAI

    def replica(self, path: str, sid: str | None = None) -> str:
        headers = {"x-session-id": sid} if sid else {}
        r = httpx.get(self.url + path, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers[REPLICA_HEADER]


@pytest.fixture(scope="module")
def cluster(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    import ray
    from ray import serve

    # The replicas (Ray's worker processes, started with this environment) keep their
    # spill folders here, not in the user's data folder.
    patch = pytest.MonkeyPatch()
    patch.setenv("HEADSTART_DATA", str(tmp_path_factory.mktemp("replicas")))
    with pg_database(pg_server) as db:
        start_ray(None, num_cpus=2)
        try:
            port = free_port()
            app = build_app({"db": db, "replicas": 2, "replica_cpus": 0, "no_pre_position": True, "no_gate": True,
                             "spill": "off"})
            deploy(app, "127.0.0.1", port)
            url = f"http://127.0.0.1:{port}"
            yield Cluster(url, OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120))
        finally:
            serve.shutdown()
            ray.shutdown()
            patch.undo()


@pytest.fixture(scope="module")
def reference(real: HFBackend) -> Iterator[Callable[[list[dict[str, str]]], str]]:
    """The cold answer to a conversation, computed here, outside the cluster."""
    from headstart.engine.engine import EngineConfig

    engine = Engine(real, config=EngineConfig(pre_position=False, gate=False)).start()
    yield lambda messages: engine.generate(Request(messages=list(messages), params=PARAMS)).text
    engine.stop()


def _chat(cluster: Cluster, sid: str, messages: list[dict[str, str]]) -> tuple[str, str, int, str]:
    """A non-streamed turn: (answer, replica, cached tokens, path)."""
    raw = cluster.client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=messages, max_tokens=PARAMS.max_tokens, temperature=0,
        extra_headers={"x-session-id": sid},
    )
    c = raw.parse()
    ext = c.model_extra["headstart"]
    assert ext["replica"] == raw.headers[REPLICA_HEADER]
    return c.choices[0].message.content, ext["replica"], c.usage.prompt_tokens_details.cached_tokens, ext["path"]


def _stream(cluster: Cluster, sid: str, messages: list[dict[str, str]]) -> tuple[str, str, int, str]:
    """A streamed turn through the proxy, read chunk by chunk."""
    stream = cluster.client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=PARAMS.max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-session-id": sid},
    )
    text, chunks, last = "", 0, None
    for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        last = chunk
    assert chunks > 3 and last is not None and last.usage is not None
    ext = last.model_extra["headstart"]
    return text, ext["replica"], last.usage.prompt_tokens_details.cached_tokens, ext["path"]


def test_sessions_stay_on_their_replica_and_answer_as_cold(cluster: Cluster, reference: Callable) -> None:
    conversations: dict[str, list[dict[str, str]]] = {f"pin-{i}": [] for i in range(4)}
    served: dict[str, list[str]] = {sid: [] for sid in conversations}
    for turn in range(3):
        for i, (sid, messages) in enumerate(conversations.items()):
            messages.append({"role": "user", "content": QUESTIONS[(i + turn) % len(QUESTIONS)]})
            answer, replica, cached, path = (_stream if turn == 2 else _chat)(cluster, sid, messages)
            assert answer == reference(messages), (sid, turn)
            if turn == 0:
                assert path == "cold" and cached == 0
            else:
                assert path == "session" and cached > 0, (sid, turn, path, cached)
            served[sid].append(replica)
            messages.append({"role": "assistant", "content": answer})
    assert all(len(set(replicas)) == 1 for replicas in served.values()), served
    # Requests without a session spread over both replicas.
    oneoffs = {_chat_oneoff(cluster) for _ in range(16)}
    assert oneoffs == set(live_replicas()) and len(oneoffs) == 2


def _chat_oneoff(cluster: Cluster) -> str:
    raw = cluster.client.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0)
    return raw.headers[REPLICA_HEADER]


def test_the_sessions_api_reaches_the_session_s_replica_by_path(cluster: Cluster) -> None:
    r = httpx.post(cluster.url + "/v1/sessions", json={"system": "You are terse."},
                   headers={"x-session-id": "by-path"}, timeout=60)
    assert r.status_code == 200, r.text
    home = r.headers[REPLICA_HEADER]
    assert r.json()["id"] == "by-path"
    assert {cluster.replica("/v1/sessions/by-path") for _ in range(8)} == {home}
    gens = []
    for _ in range(2):
        g = httpx.post(cluster.url + "/v1/sessions/by-path/generate", json={"prompt": "Say hi.", "max_tokens": 4,
                                                                          "temperature": 0}, timeout=120)
        assert g.status_code == 200 and g.headers[REPLICA_HEADER] == home, g.text
        gens.append(g.json())
    assert gens[1]["usage"]["cached_tokens"] > 0 and gens[0]["text"] == gens[1]["text"]
    with httpx.stream("GET", cluster.url + "/v1/sessions/by-path/events", timeout=60) as events:
        assert events.status_code == 200 and events.headers[REPLICA_HEADER] == home
        assert next(events.iter_lines()) == "event: subscribed"
    # Any replica lists every session (from the shared store).
    listed = {httpx.get(cluster.url + "/v1/sessions", timeout=60).headers[REPLICA_HEADER] for _ in range(12)}
    assert len(listed) == 2
    for _ in range(4):
        ids = {s["id"] for s in httpx.get(cluster.url + "/v1/sessions", timeout=60).json()["data"]}
        assert "by-path" in ids
    # Each replica's metrics are reachable by its name, as listed for a Prometheus scraper.
    targets = httpx.get(cluster.url + "/replicas", timeout=60).json()
    assert sorted(t["labels"]["replica"] for t in targets) == live_replicas()
    for t in targets:
        m = httpx.get(cluster.url + t["labels"]["__metrics_path__"], timeout=60)
        assert m.status_code == 200 and m.headers[REPLICA_HEADER] == t["labels"]["replica"]
        assert "headstart_requests_total" in m.text


def test_a_client_disconnect_through_the_proxy_cancels_the_turn(cluster: Cluster) -> None:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    headers = {"x-session-id": "leaver"}
    with httpx.stream("POST", cluster.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:") and next(lines) == ""
    deadline = time.monotonic() + 60
    while True:
        s = httpx.get(cluster.url + "/v1/sessions/leaver", timeout=60).json()
        if not s["busy"]:
            break
        assert time.monotonic() < deadline, "the abandoned stream kept the session busy"
        time.sleep(0.2)
    assert s["turns"] == 0  # the cut answer was never committed


def test_a_killed_replica_s_sessions_go_on_exactly_on_another(cluster: Cluster, reference: Callable) -> None:
    import ray

    sid = "survivor"
    messages: list[dict[str, str]] = []
    for q in QUESTIONS[:2]:
        messages.append({"role": "user", "content": q})
        answer, home, _, _ = _chat(cluster, sid, messages)
        messages.append({"role": "assistant", "content": answer})
    # A long answer is streaming from the session's replica when that replica dies.
    long = {"model": "smollm2-135m", "messages": [*messages, {"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/chat/completions", json=long, headers={"x-session-id": sid},
                      timeout=60) as r:
        assert r.headers[REPLICA_HEADER] == home
        lines = r.iter_lines()
        next(lines)
        ray.kill(ray.get_actor(ACTOR_PREFIX + home, namespace="serve"), no_restart=True)
        with pytest.raises(httpx.RemoteProtocolError):  # cut, never a [DONE]: not replayed elsewhere
            for line in lines:
                assert line != "data: [DONE]"
    # The next turn goes to another replica, which rebuilds the KV from the transcript.
    messages.append({"role": "user", "content": QUESTIONS[2]})
    answer, replica, cached, path = _chat(cluster, sid, messages)
    assert replica != home and path == "cold" and cached == 0
    assert answer == reference(messages)
    messages.append({"role": "assistant", "content": answer})
    stored = httpx.get(cluster.url + "/v1/sessions/" + sid, timeout=60).json()
    assert stored["turns"] == 3 and stored["messages"] == len(messages)  # the cut turn is not among them
    # Serve replaces the dead replica; the ring changes again and the session stays exact.
    deadline = time.monotonic() + 240
    while len(live_replicas()) != 2 or home in live_replicas():
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1)
    for q in QUESTIONS[3:5]:
        messages.append({"role": "user", "content": q})
        answer, replica, _, path = _chat(cluster, sid, messages)
        assert answer == reference(messages)
        messages.append({"role": "assistant", "content": answer})
    assert json.loads(httpx.get(cluster.url + "/v1/sessions/" + sid, timeout=60).text)["turns"] == 5


def test_replicas_refuse_a_store_they_cannot_share(tmp_path: Path) -> None:
    """SQLite is one server's: replicas without PostgreSQL stop before starting Ray."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "headstart.cli", "serve", "--replicas", "2", "--db",
                        str(tmp_path / "h.db")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pass --db postgresql://" in r.stderr


def test_a_session_can_be_created_under_its_header_id(tiny: HFBackend) -> None:
    """A header-only router places a new session by ``x-session-id``: creation takes the id
    from there when the body names none, and refuses two different ids."""
    from tests.apiutil import serve

    with serve(tiny) as served:
        r = served.client.post("/v1/sessions", json={}, headers={"x-session-id": "from-header"})
        assert r.status_code == 200 and r.json()["id"] == "from-header"
        r = served.client.post("/v1/sessions", json={"id": "a"}, headers={"x-session-id": "b"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "id"
        assert [s["id"] for s in served.client.get("/v1/sessions").json()["data"]] == ["from-header"]
