"""The documented limits are the enforced ones: a session's window bounds (docs, OpenAPI,
the server's checks) and the data queue's ``max_pending``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from headstart.config import MIN_WINDOW
from headstart.engine import sessions as sessionapi
from headstart.idle.ingest import DataFeed, Entry
from headstart.model import HFBackend
from tests.apiutil import Served, serve


@pytest.fixture(scope="module")
def srv(tiny: HFBackend) -> Iterator[Served]:
    with serve(tiny, engine={"pre_position": False}) as s:
        yield s


def test_window_bounds_are_what_the_document_says(srv: Served) -> None:
    room = sessionapi.context_room(srv.engine)
    assert room == srv.engine.backend.info.context_length - srv.engine.config.context_reserve
    doc = srv.client.get("/openapi.json").json()
    window = doc["components"]["schemas"]["CreateSessionRequest"]["properties"]["window"]
    bounds = next(a for a in window["anyOf"] if a.get("type") == "integer")
    assert (bounds["minimum"], bounds["maximum"]) == (MIN_WINDOW, room)
    for value, status in ((MIN_WINDOW - 1, 400), (MIN_WINDOW, 200), (room, 200), (room + 1, 400), (0, 400)):
        r = srv.client.post("/v1/sessions", json={"window": value})
        assert r.status_code == status, (value, r.text)
        if status == 400:
            assert r.json()["error"]["param"] == "window"
    docs = (Path(__file__).parent.parent / "docs" / "sessions-api.md").read_text()
    assert f"`window` (tokens, {MIN_WINDOW} to the model's context less `--context-reserve`" in docs


def test_pending_never_exceeds_max_pending_while_a_batch_is_in_flight() -> None:
    feed = DataFeed(max_pending=4)
    feed.push([Entry(f"e{i}", 3) for i in range(4)])
    batch = feed.take(budget=8)  # two entries go in flight: still pending until ingested
    assert len(batch) == 2 and feed.counters()["pending"] == 4
    result = feed.push([Entry(f"n{i}", 3) for i in range(3)])
    assert result.pending == 4 and feed.counters()["pending"] == 4
    assert result.dropped == 3 and feed.counters()["dropped"] == 3
    assert [e.text for e in feed.inflight] == ["e0", "e1"]  # the batch in flight is never dropped
    assert [e.text for e in feed.pending] == ["n1", "n2"]  # the oldest waiting ones go first
    feed.commit()
    assert feed.counters()["pending"] == 2 and feed.counters()["ingested"] == 2


def test_the_session_limit_reaches_an_http_client_as_openai_s_429(tiny: HFBackend) -> None:
    """``--max-sessions`` full: a new session, by ``x-session-id`` or through the sessions API,
    is a 429 in OpenAI's shape (the official client raises its ``RateLimitError``); it creates
    nothing; sessionless requests and the sessions held still go on; a delete makes room."""
    import openai

    hi = [{"role": "user", "content": "Hi."}]
    with serve(tiny, engine={"pre_position": False, "max_sessions": 2}) as s:
        oa = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        for sid in ("first", "second"):
            oa.chat.completions.create(model="tiny-llama", messages=hi, max_tokens=2,
                                       extra_headers={"x-session-id": sid})
        with pytest.raises(openai.RateLimitError) as refused:
            oa.chat.completions.create(model="tiny-llama", messages=hi, max_tokens=2,
                                       extra_headers={"x-session-id": "third"})
        assert refused.value.status_code == 429
        body = refused.value.response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        error = body["error"]
        assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "too_many_sessions", None)
        assert "maximum of 2 sessions" in error["message"]
        retry_after = refused.value.response.headers.get("retry-after")
        assert retry_after is None or float(retry_after) >= 0  # the client waits that long if the server says
        r = s.client.post("/v1/sessions", json={"id": "third"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions", r.text
        assert {x["id"] for x in s.client.get("/v1/sessions").json()["data"]} == {"first", "second"}
        assert s.client.get("/v1/sessions/third").status_code == 404  # the refusal created nothing
        oa.chat.completions.create(model="tiny-llama", messages=hi, max_tokens=2)  # a one-off still answers
        again = oa.chat.completions.create(model="tiny-llama", messages=hi, max_tokens=2,
                                           extra_headers={"x-session-id": "first"})
        assert again.model_extra["headstart"]["session_id"] == "first"  # a held session goes on
        assert s.client.delete("/v1/sessions/second").status_code == 200
        made = oa.chat.completions.create(model="tiny-llama", messages=hi, max_tokens=2,
                                          extra_headers={"x-session-id": "third"})
        assert made.model_extra["headstart"]["session_id"] == "third"
