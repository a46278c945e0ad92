"""The sessions API over real HTTP on loopback (tiny model: the logic, not the model's skill)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from headstart.idle.queries import QUESTION_ROLE
from headstart.model import HFBackend
from headstart.session.template import ChatTemplate
from tests.apiutil import Blocker, Served, SSEReader, serve, settle, wait_until

HI = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def srv(tiny: HFBackend) -> Iterator[Served]:
    with serve(tiny, engine={"max_pending": 4, "max_queries": 3}) as served:
        yield served


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_session_lifecycle(srv: Served) -> None:
    c = srv.client
    r = c.post("/v1/sessions", json={"id": "life", "system": "You are terse.", "window": 1024})
    assert r.status_code == 200, r.text
    s = r.json()
    for field in ("id", "created", "last_used", "tokens", "kv_tokens", "busy", "turns", "data_version", "pending",
                  "pre_position", "ready", "ready_token", "ready_gap", "paths"):
        assert field in s
    assert (s["id"], s["window"], s["pre_position"], s["data_version"]) == ("life", 1024, True, 0)
    assert error_of(c.post("/v1/sessions", json={"id": "life"}), 409)["code"] == "session_exists"
    settle(srv, "life")
    s = c.get("/v1/sessions/life").json()
    assert s["tokens"] > 0 and s["ready"] is True and s["kv_bytes"] > 0  # the system prompt was pre-positioned
    generated = c.post("/v1/sessions", json={"pre_position": False}).json()
    assert len(generated["id"]) >= 16 and generated["pre_position"] is False
    ids = {x["id"] for x in c.get("/v1/sessions").json()["data"]}
    assert {"life", generated["id"]} <= ids
    assert c.delete("/v1/sessions/life").json() == {"id": "life", "object": "session.deleted", "deleted": True}
    error_of(c.get("/v1/sessions/life"), 404)
    error_of(c.delete("/v1/sessions/life"), 404)
    assert error_of(c.post("/v1/sessions", json={"id": "bad id!"}), 400)["param"] == "id"
    assert error_of(c.post("/v1/sessions", json={"window": 10}), 400)["param"] == "window"
    assert error_of(c.post("/v1/sessions", json={"colour": "red"}), 400)["param"] == "colour"


def test_busy_session_answers_409(srv: Served) -> None:
    c = srv.client
    c.post("/v1/sessions", json={"id": "busy", "pre_position": False})
    out: dict = {}
    with Blocker(srv.engine):
        t = threading.Thread(target=lambda: out.update(r=c.post(
            "/v1/sessions/busy/generate", json={"prompt": "hi", "max_tokens": 2})))
        t.start()
        wait_until(lambda: srv.engine.get_session("busy").busy)
        assert c.get("/v1/sessions/busy").json()["busy"] is True
        assert error_of(c.post("/v1/sessions/busy/generate", json={"prompt": "x"}), 409)["code"] == "session_busy"
        error_of(c.delete("/v1/sessions/busy"), 409)
        error_of(c.post("/v1/sessions/busy/warm", json={"messages": HI}), 409)
        error_of(c.post("/v1/chat/completions", headers={"x-session-id": "busy"}, json={"messages": HI}), 409)
    t.join(60)
    assert out["r"].status_code == 200


def test_push_is_bounded_and_ingested_in_order(srv: Served) -> None:
    c = srv.client
    c.post("/v1/sessions", json={"id": "feed", "pre_position": False})
    with Blocker(srv.engine):  # nothing is ingested while we push
        r1 = c.post("/v1/sessions/feed/push", json={"entries": ["e1", "e2", "e3"]}).json()
        r2 = c.post("/v1/sessions/feed/push", json={"entries": ["e4", "e5"]}).json()
    assert (r1["pushed"], r1["dropped"], r1["pending"], r1["data_version"]) == (3, 0, 3, 0)
    assert (r2["pushed"], r2["dropped"], r2["pending"], r2["max_pending"]) == (2, 1, 4, 4)
    settle(srv, "feed")
    s = c.get("/v1/sessions/feed").json()
    assert (s["pending"], s["pushed"], s["ingested"], s["dropped"]) == (0, 5, 4, 1)
    assert s["data_version"] >= 1
    session = srv.engine.get_session("feed")
    data = "\n".join(m["content"] for m in session.messages if m["role"] == "user")
    assert data == "e2\ne3\ne4\ne5"  # the oldest waiting entry was dropped; order kept
    template = ChatTemplate(srv.engine.backend.tokenizer)
    assert session.kv_ids == template.entry(session.messages, "user")  # KV-resident, exactly
    assert error_of(c.post("/v1/sessions/feed/push", json={"entries": []}), 400)["param"] == "entries"
    assert error_of(c.post("/v1/sessions/feed/push", json={"entries": ["ok", 3]}), 400)["param"] == "entries[1]"
    error_of(c.post("/v1/sessions/nope/push", json={"entries": ["x"]}), 404)


def test_window_slides_and_keeps_the_system_prompt(srv: Served) -> None:
    c = srv.client
    c.post("/v1/sessions", json={"id": "win", "system": "Readings follow.", "window": 200, "pre_position": False})
    for i in range(12):
        c.post("/v1/sessions/win/push", json={"entries": [f"reading {i}: " + "value " * 6]})
        settle(srv, "win")
    session = srv.engine.get_session("win")
    assert session.messages[0] == {"role": "system", "content": "Readings follow."}
    assert "reading 11" in session.messages[-1]["content"]
    assert all("reading 0:" not in m["content"] for m in session.messages)  # slid out
    assert len(session.kv_ids) <= 200
    template = ChatTemplate(srv.engine.backend.tokenizer)
    assert session.kv_ids == template.entry(session.messages, "user")
    assert c.get("/v1/sessions/win").json()["ingested"] == 12
    long_entry = "word " * 400
    err = error_of(c.post("/v1/sessions/win/push", json={"entries": [long_entry]}), 400)
    assert err["param"] == "entries[0]" and "tokens" in err["message"]


def test_generate_is_ephemeral_and_reports_its_path(srv: Served) -> None:
    c = srv.client
    c.post("/v1/sessions", json={"id": "gen", "system": "Answer yes or no.", "pre_position": False})
    c.post("/v1/sessions/gen/push", json={"entries": ["the light is on"]})
    settle(srv, "gen")
    before = srv.engine.get_session("gen").messages
    r = c.post("/v1/sessions/gen/generate", json={"prompt": "Is the light on?", "max_tokens": 3, "temperature": 0})
    g = r.json()
    assert r.status_code == 200, g
    assert g["path"] == "entry" and g["speculative"] is False and g["data_version"] == 1
    assert g["usage"]["cached_tokens"] > 0 and g["usage"]["completion_tokens"] <= 3
    assert isinstance(g["logit_gap"], float)
    settle(srv, "gen")
    assert srv.engine.get_session("gen").messages == before  # ephemeral: the context is unchanged
    assert srv.engine.get_session("gen").turns == 0
    f = c.post("/v1/sessions/gen/generate", json={"prompt": "Is it?", "fast_answer": ["yes", "no"],
                                                  "temperature": 0}).json()
    assert f["text"] in ("yes", "no") and f["candidate"] in (0, 1)
    err = error_of(c.post("/v1/sessions/gen/generate", json={"prompt": "word " * 5000}), 400)
    asked = [*srv.engine.get_session("gen").messages, {"role": QUESTION_ROLE, "content": "word " * 5000}]
    prompt_tokens = len(srv.engine.template.render(asked))
    assert err["code"] == "context_length_exceeded"
    assert {str(prompt_tokens), "4096"} <= set(re.findall(r"\d+", err["message"])), err  # both lengths
    assert error_of(c.post("/v1/sessions/gen/generate", json={"prompt": ""}), 400)["param"] == "prompt"
    assert error_of(c.post("/v1/sessions/gen/generate", json={"prompt": "x", "temperature": 9}), 400)["param"] == \
        "temperature"


def test_generate_is_exact_even_with_the_gate_forced_open(srv: Served) -> None:
    """generate answers whole, not streamed: with a ready position parked and the gate forced
    open, the question still gets the answer of the full computation (the gate would save
    this client nothing), and the session object says where the gate stands."""
    c = srv.client
    c.post("/v1/sessions", json={"id": "spec", "system": "Answer yes or no."})
    settle(srv, "spec")
    described = c.get("/v1/sessions/spec").json()
    assert described["ready"] is True
    assert described["gate"]["open"] is False and "too little evidence" in described["gate"]["reason"]
    body = {"prompt": "Is the sky blue?", "fast_answer": ["yes", "no"], "temperature": 0}
    g = c.post("/v1/sessions/spec/generate", json={**body, "gap_threshold": 0}).json()
    assert (g["speculative"], g["verified"]) == (False, None) and g["path"] != "gate"
    assert g["text"] in ("yes", "no") and g["logit_gap"] >= 0
    settle(srv, "spec")
    again = c.post("/v1/sessions/spec/generate", json={**body, "gate": False}).json()
    assert again["text"] == g["text"]


def test_registered_questions(srv: Served) -> None:
    c = srv.client
    c.post("/v1/sessions", json={"id": "qs", "system": "Count the entries.", "pre_position": False})
    q = c.post("/v1/sessions/qs/queries", json={"id": "count", "question": "How many?", "max_tokens": 4}).json()
    assert (q["id"], q["fresh"], q["value"]) == ("count", False, None)
    c.post("/v1/sessions/qs/queries", json={"prompt": "Any?", "fast_answer": ["yes", "no"]})
    assert error_of(c.post("/v1/sessions/qs/queries", json={"id": "count", "question": "x"}), 409)["code"] == \
        "query_exists"
    c.post("/v1/sessions/qs/push", json={"entries": ["a", "b"]})
    settle(srv, "qs")
    listed = c.get("/v1/sessions/qs/queries").json()["data"]
    assert listed[0]["id"] == "count" and len(listed) == 2
    assert all(x["fresh"] and x["data_version"] == 1 and x["value"] is not None for x in listed)
    assert listed[1]["value"] in ("yes", "no") and listed[1]["candidate"] in (0, 1)
    count = c.get("/v1/sessions/qs/queries/count").json()
    evaluations = count["evaluations"]
    hit = c.post("/v1/sessions/qs/generate", json={"prompt": "How many?", "max_tokens": 4, "temperature": 0}).json()
    assert hit["path"] == "ready_exact" and hit["logit_gap"] == pytest.approx(count["confidence"])
    assert hit["text"].strip() == count["value"]
    # ...and both are what a cold computation of the same question gives.
    asked = [*srv.engine.get_session("qs").messages, {"role": QUESTION_ROLE, "content": "How many?"}]
    cold = c.post("/v1/chat/completions", json={"messages": asked, "max_tokens": 4, "temperature": 0}).json()
    assert cold["headstart"]["path"] == "cold" and cold["choices"][0]["message"]["content"] == hit["text"]
    c.post("/v1/sessions/qs/push", json={"entries": ["c"]})
    settle(srv, "qs")
    count = c.get("/v1/sessions/qs/queries/count").json()
    assert (count["data_version"], count["fresh"], count["evaluations"]) == (2, True, evaluations + 1)
    c.post("/v1/sessions/qs/queries", json={"question": "third"})
    err = error_of(c.post("/v1/sessions/qs/queries", json={"question": "fourth"}), 400)
    assert err["code"] == "too_many_queries"
    assert c.delete("/v1/sessions/qs/queries/count").json()["deleted"] is True
    error_of(c.get("/v1/sessions/qs/queries/count"), 404)
    error_of(c.delete("/v1/sessions/qs/queries/count"), 404)
    settle(srv, "qs")
    assert "query:count" not in srv.engine.get_session("qs").ready  # its parked state went too
    assert error_of(c.post("/v1/sessions/qs/queries", json={"question": "x", "max_tokens": 99}), 400)["param"] == \
        "max_tokens"


def test_events_stream(srv: Served) -> None:
    c = srv.client
    c.post("/v1/sessions", json={"id": "ev", "pre_position": False})
    c.post("/v1/sessions/ev/queries", json={"id": "q", "question": "What now?", "max_tokens": 2})
    settle(srv, "ev")
    with SSEReader(f"{srv.url}/v1/sessions/ev/events") as sse:
        sse.next("heartbeat", timeout=10)
        assert c.get("/v1/sessions/ev").json()["listeners"] == 1
        c.post("/v1/sessions/ev/push", json={"entries": ["one", "two"]})
        updated = sse.next("data_updated")
        assert updated["data_version"] == 1 and updated["ingested_now"] == 2
        answered = sse.next("query_answered")
        assert answered["query_id"] == "q" and answered["data_version"] == 1 and answered["fresh"] is True
        assert isinstance(answered["confidence"], float) and isinstance(answered["value"], str)
        c.delete("/v1/sessions/ev")
        sse.next("closed", timeout=10)
        assert sse.ended.wait(10)  # the server ended the stream
    r = c.get("/v1/sessions/ev/events")
    error_of(r, 404)


def test_events_listener_leaves_when_the_client_goes(srv: Served) -> None:
    srv.client.post("/v1/sessions", json={"id": "gone", "pre_position": False})
    hub = srv.engine.get_session("gone").events
    with httpx.stream("GET", f"{srv.url}/v1/sessions/gone/events", timeout=30) as r:
        lines = r.iter_lines()  # kept: a discarded line iterator closes the connection
        assert next(lines) == "event: subscribed"
        assert hub.listeners == 1
    deadline = time.monotonic() + 10
    while hub.listeners and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hub.listeners == 0


def test_event_streams_are_capped_and_give_their_places_back(tiny: HFBackend) -> None:
    """Past ``max_event_streams`` open streams one more is a 429 in the OpenAI shape (a
    stream refused this way is never counted); a closed one frees its place."""
    with serve(tiny, max_event_streams=2) as served, contextlib.ExitStack() as streams:
        served.client.post("/v1/sessions", json={"id": "watched", "pre_position": False})
        url = f"{served.url}/v1/sessions/watched/events"
        opened = []
        for _ in range(2):
            r = streams.enter_context(httpx.stream("GET", url, timeout=30))
            lines = r.iter_lines()  # kept: a discarded line iterator closes the connection
            assert r.status_code == 200 and next(lines) == "event: subscribed"
            opened.append((r, lines))
        for _ in range(2):
            err = error_of(served.client.get("/v1/sessions/watched/events"), 429)
            assert err["code"] == "too_many_event_streams" and err["type"] == "rate_limit_error"
        opened[0][0].close()

        def one_more_opens() -> bool:
            with httpx.stream("GET", url, timeout=30) as r:
                return r.status_code == 200 and next(r.iter_lines()) == "event: subscribed"

        wait_until(one_more_opens, timeout=10)


def test_warm_then_the_real_turn_is_ready_exact(srv: Served) -> None:
    c = srv.client
    c.post("/v1/sessions", json={"id": "warm", "pre_position": False})
    body = {"messages": [{"role": "system", "content": "Be brief."}, *HI], "max_tokens": 3, "temperature": 0}
    w = c.post("/v1/sessions/warm/warm", json=body).json()
    assert w["status"] == "warmed" and w["warmed_tokens"] == w["prompt_tokens"] > 0
    again = c.post("/v1/sessions/warm/warm", json=body).json()
    assert again["status"] == "covered" and again["warmed_tokens"] == 0
    oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
    raw = oa.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=body["messages"], max_tokens=3, temperature=0,
        extra_headers={"x-session-id": "warm"},
    )
    done = raw.parse()
    ext = raw.http_response.json()["headstart"]
    assert ext["path"] == "ready_exact"
    assert done.usage.prompt_tokens_details.cached_tokens == w["prompt_tokens"]
    cold = oa.chat.completions.create(model="tiny-llama", messages=body["messages"], max_tokens=3, temperature=0)
    assert done.choices[0].message.content == cold.choices[0].message.content
    error_of(c.post("/v1/sessions/warm/warm", json={"messages": []}), 400)
    error_of(c.post("/v1/sessions/nope/warm", json=body), 404)


def test_warm_cancelled_by_a_real_request_keeps_its_work(tiny: HFBackend) -> None:
    with serve(tiny, engine={"background_chunk": 2}) as srv:
        c = srv.client
        c.post("/v1/sessions", json={"id": "w", "pre_position": False})
        messages = [{"role": "user", "content": "tell me " * 1500}]
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(r=c.post("/v1/sessions/w/warm", json={"messages": messages})))
        t.start()
        session = srv.engine.get_session("w")
        wait_until(lambda: len(session.kv_ids) >= 40)
        chat: dict = {}
        with Blocker(srv.engine):  # the warm is held within one chunk of here while the request arrives
            assert len(session.kv_ids) < len(srv.engine.template.render(messages))
            asker = threading.Thread(target=lambda: chat.update(r=c.post(
                "/v1/chat/completions", headers={"x-session-id": "w"}, json={"messages": messages, "max_tokens": 1})))
            asker.start()
            wait_until(lambda: session.busy)  # the request took the session over, cancelling the warm
        asker.join(60)
        r = chat["r"]
        t.join(60)
        w = out["r"].json()
        assert w["status"] == "cancelled" and w["warmed_tokens"] >= 40, w
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= w["warmed_tokens"]
        with Blocker(srv.engine):  # cancelled while still queued: nothing done
            t = threading.Thread(target=lambda: out.update(r=c.post("/v1/sessions/w/warm", json={"messages": HI})))
            t.start()
            wait_until(lambda: srv.engine.get_session("w").warm_ticket is not None)
            c2 = threading.Thread(target=lambda: c.post("/v1/sessions/w/generate", json={"prompt": "x",
                                                                                         "max_tokens": 1}))
            c2.start()
            t.join(30)
        c2.join(30)
        assert out["r"].json()["status"] == "cancelled" and out["r"].json()["warmed_tokens"] == 0


def test_errors_are_openai_shaped(srv: Served) -> None:
    c = srv.client
    assert error_of(c.post("/v1/sessions", content=b"{nope"), 400)["code"] == "invalid_json"
    assert error_of(c.post("/v1/sessions", content=b"[1, 2]"), 400)["message"]
    assert error_of(c.post("/v1/sessions", content=b'{"system": "\\ud800"}'), 400)["code"] == "invalid_json"
    assert error_of(c.post("/v1/sessions", content=b"[" * 100_000), 400)["code"] == "invalid_json"
    big = b'{"entries": ["' + b"x" * (4 * 1024 * 1024) + b'"]}'
    assert error_of(c.post("/v1/sessions", content=big), 413)["code"] == "body_too_large"
    error_of(c.get("/v1/nothing-here"), 404)
    error_of(c.put("/v1/sessions"), 405)
    error_of(c.post("/v1/sessions/nope/generate", json={"prompt": "x"}), 404)
    one = c.post("/v1/chat/completions", json={"messages": HI, "fast_answer": ["only"], "max_tokens": 1})
    assert one.status_code == 200 and one.json()["headstart"]["logit_gap"] is None  # infinite gap, not a 500
    assert c.get("/health").json()["status"] == "ok"


def test_openapi_documents_every_route(srv: Served) -> None:
    from starlette.routing import Route

    doc = srv.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {
        (route.path, method) for route in srv.app.routes if isinstance(route, Route)
        for method in route.methods or () if method != "HEAD"
    }
    assert served == documented
    schemas = doc["components"]["schemas"]
    assert {"SessionObject", "PushRequest", "GenerateResponse", "QueryObject", "WarmResponse", "ErrorResponse"} <= \
        set(schemas)
    push = doc["paths"]["/v1/sessions/{session_id}/push"]["post"]
    assert push["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/PushRequest"}
