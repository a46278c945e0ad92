"""Streamed data on the default model, over real HTTP: a window that slides and a batch whose
ingestion a request interrupts change what the session holds, never what it answers. Every
answer is compared with a one-off chat completion of the same messages (greedy)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from headstart.model import HFBackend
from headstart.session.template import ChatTemplate
from tests.apiutil import Blocker, Served, serve, settle, wait_until

pytestmark = pytest.mark.real

SYSTEM = "You log a temperature sensor. Answer with the reading only."
QUESTION = "What is the most recent temperature reading?"
MAX_TOKENS = 8
PUSHES = 9


@pytest.fixture(scope="module")
def srv(real: HFBackend) -> Iterator[Served]:
    with serve(real, engine={"pre_position": False}) as served:
        yield served


def _reading(i: int) -> str:
    return f"{9 + i // 6:02d}:{i % 6 * 10:02d} temperature {17 + i % 9} C"


def _ask(srv: Served, sid: str) -> dict[str, Any]:
    """The question against the session's context, and the same question cold."""
    r = srv.client.post(f"/v1/sessions/{sid}/generate",
                        json={"prompt": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _cold(srv: Served, messages: list[dict[str, str]]) -> str:
    body = {"messages": [*messages, {"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    r = srv.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["headstart"]["path"] == "cold", r.text
    return r.json()["choices"][0]["message"]["content"]


def _data(srv: Served, sid: str) -> list[str]:
    """The session's data messages (every one but the system prompt), as the engine holds them."""
    return [m["content"] for m in srv.engine.get_session(sid).messages if m["role"] != "system"]


def test_answers_after_the_window_slides_equal_a_cold_computation(srv: Served) -> None:
    c = srv.client
    assert c.post("/v1/sessions", json={"id": "slide", "system": SYSTEM, "window": 200,
                                        "pre_position": False}).status_code == 200
    template = ChatTemplate(srv.engine.backend.tokenizer)
    slides, pushed = 0, []
    for i in range(PUSHES):  # some 40 tokens a push: the window slides every second push from the fifth
        pushed.append("; ".join(_reading(3 * i + j) for j in range(3)))
        before = _data(srv, "slide")
        assert c.post("/v1/sessions/slide/push", json={"entries": [pushed[-1]]}).status_code == 200
        settle(srv, "slide")
        after = _data(srv, "slide")
        assert after[-1] == pushed[-1]
        if before and after[0] != before[0]:
            slides += 1
            session = srv.engine.get_session("slide")
            assert session.messages[0] == {"role": "system", "content": SYSTEM}  # never slid out
            assert len(template.entry(session.messages, "user")) <= 200 * 3 // 4  # slid to 3/4 of the window
            if slides in (1, 3):  # right after the first slide, and after a few
                answer = _ask(srv, "slide")
                assert answer["path"] in ("entry", "session") and answer["data_version"] == i + 1
                assert answer["text"] == _cold(srv, session.messages), (slides, answer)
    assert slides >= 3, slides
    kept = _data(srv, "slide")
    assert kept == pushed[-len(kept):] and len(kept) < PUSHES  # the newest, in order
    info = c.get("/v1/sessions/slide").json()
    assert (info["ingested"], info["pending"], info["dropped"]) == (PUSHES, 0, 0)


def test_an_interrupted_batch_is_ingested_once_in_order_and_answers_stay_exact(srv: Served) -> None:
    c = srv.client
    assert c.post("/v1/sessions", json={"id": "cut", "system": SYSTEM, "pre_position": False}).status_code == 200
    c.post("/v1/sessions/cut/push", json={"entries": [_reading(0)]})
    settle(srv, "cut")
    first = srv.engine.get_session("cut")
    base, committed = len(first.kv_ids), list(first.messages)
    batch = [_reading(i) for i in range(1, 25)]  # one batch of some 360 tokens, prefilled in chunks
    assert c.post("/v1/sessions/cut/push", json={"entries": batch}).json()["pending"] == len(batch)
    out: dict[str, Any] = {}
    # Catch the batch half-way: some of its rows are in the KV, it is not committed yet.
    wait_until(lambda: base < len(srv.engine.get_session("cut").kv_ids) < base + 200, timeout=120)
    with Blocker(srv.engine):  # the model thread is held between two chunks of the batch
        info = c.get("/v1/sessions/cut").json()
        assert info["data_version"] == 1 and info["pending"] == len(batch), info
        assert base < info["kv_tokens"] < base + 200
        late = c.post("/v1/sessions/cut/push", json={"entries": ["late reading: 30 C"]}).json()
        assert (late["pushed"], late["dropped"], late["pending"]) == (1, 0, len(batch) + 1)
        asking = threading.Thread(target=lambda: out.update(answer=_ask(srv, "cut")))
        asking.start()
        wait_until(lambda: srv.engine.get_session("cut").busy)
    asking.join(120)
    answer = out["answer"]  # the request went first: on the context before the batch
    assert answer["data_version"] == 1 and answer["path"] in ("entry", "session"), answer
    assert answer["text"] == _cold(srv, committed)

    settle(srv, "cut")  # the interrupted batch is taken up again, then the late entry
    session = srv.engine.get_session("cut")
    assert _data(srv, "cut") == [_reading(0), "\n".join(batch), "late reading: 30 C"]  # once each, in order
    info = c.get("/v1/sessions/cut").json()
    assert (info["data_version"], info["ingested"], info["pending"], info["dropped"]) == (3, 26, 0, 0)
    assert session.kv_ids == ChatTemplate(srv.engine.backend.tokenizer).entry(session.messages, "user")
    after = _ask(srv, "cut")
    assert after["data_version"] == 3 and after["text"] == _cold(srv, session.messages)
