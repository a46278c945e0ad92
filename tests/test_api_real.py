"""End to end on the default model: streaming data, a registered question answered in the
background and then from the cache, SSE events, and a warm turn, through httpx and the
``openai`` client against the real server on loopback. Every cached answer must equal what a
cold computation of the same prompt gives."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from headstart.model import HFBackend
from tests.apiutil import Served, SSEReader, serve, settle

pytestmark = pytest.mark.real

SYSTEM = "You log a temperature sensor. Answer with the reading only."
QUESTION = "What is the most recent temperature reading?"


@pytest.fixture(scope="module")
def srv(real: HFBackend) -> Iterator[Served]:
    with serve(real, heartbeat_seconds=1.0) as served:
        yield served


def cold_text(oa: openai.OpenAI, messages: list[dict], max_tokens: int) -> str:
    """The same prompt as a one-off chat completion: no session, nothing cached."""
    out = oa.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=max_tokens, temperature=0)
    return out.choices[0].message.content or ""


def test_registered_question_is_answered_in_the_background_and_then_from_the_cache(
    srv: Served, oa: openai.OpenAI
) -> None:
    created = oa.post("/sessions", cast_to=object, body={"id": "sensor", "system": SYSTEM, "pre_position": False})
    assert created["id"] == "sensor"  # type: ignore[index]
    q = oa.post("/sessions/sensor/queries", cast_to=object, body={"id": "last", "question": QUESTION,
                                                                   "max_tokens": 8})
    assert q["fresh"] is False  # type: ignore[index]
    settle(srv, "sensor")
    with SSEReader(f"{srv.url}/v1/sessions/sensor/events") as sse:
        pushed = srv.client.post("/v1/sessions/sensor/push", json={"entries": [
            "09:00 temperature 21 C", "09:05 temperature 22 C", "09:10 temperature 24 C"]}).json()
        assert (pushed["pushed"], pushed["dropped"]) == (3, 0)
        assert sse.next("data_updated")["data_version"] == 1
        answered = sse.next("query_answered", where=lambda d: d["data_version"] == 1)
    assert answered["query_id"] == "last" and answered["fresh"] is True
    assert isinstance(answered["confidence"], float) and answered["value"]

    settle(srv, "sensor")  # idle time passes; then the same question is asked
    hit = srv.client.post("/v1/sessions/sensor/generate", json={"prompt": QUESTION, "max_tokens": 8,
                                                                "temperature": 0}).json()
    assert hit["path"] == "ready_exact" and hit["timing"]["forwards_before_first_token"] == 0
    assert hit["data_version"] == 1 and hit["logit_gap"] == pytest.approx(answered["confidence"])
    assert hit["text"].strip() == answered["value"]
    session = srv.engine.get_session("sensor")
    context = [*session.messages, {"role": "user", "content": QUESTION}]
    assert context[0] == {"role": "system", "content": SYSTEM} and "09:10" in context[1]["content"]
    assert hit["text"] == cold_text(oa, context, 8)

    listed = oa.get("/sessions/sensor/queries", cast_to=object)["data"]  # type: ignore[index]
    assert listed[0]["value"] == answered["value"] and listed[0]["fresh"] is True

    # New data: the answer is recomputed at the new version and is again a cache hit.
    oa.post("/sessions/sensor/push", cast_to=object, body={"entries": ["09:15 temperature 19 C"]})
    settle(srv, "sensor")
    again = oa.get("/sessions/sensor/queries/last", cast_to=object)
    assert again["data_version"] == 2 and again["fresh"] is True  # type: ignore[index]
    hit2 = oa.post("/sessions/sensor/generate", cast_to=object, body={"prompt": QUESTION, "max_tokens": 8,
                                                                       "temperature": 0})
    assert hit2["path"] == "ready_exact" and hit2["data_version"] == 2  # type: ignore[index]
    assert hit2["text"].strip() == again["value"]  # type: ignore[index]
    info = oa.get("/sessions/sensor", cast_to=object)
    assert (info["data_version"], info["ingested"], info["pending"]) == (2, 4, 0)  # type: ignore[index]
    assert oa.delete("/sessions/sensor", cast_to=object)["deleted"] is True  # type: ignore[index]


def test_warm_turn_makes_the_next_turn_ready_exact_and_exact(srv: Served, oa: openai.OpenAI) -> None:
    oa.post("/sessions", cast_to=object, body={"id": "talk", "pre_position": False})
    turn1 = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    first = oa.chat.completions.create(model="smollm2-135m", messages=turn1, max_tokens=12, temperature=0,
                                       extra_headers={"x-session-id": "talk"})
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content or ""},
             {"role": "user", "content": "And of Germany?"}]
    warmed = oa.post("/sessions/talk/warm", cast_to=object, body={"messages": turn2})
    assert warmed["status"] == "warmed" and 0 < warmed["warmed_tokens"] < warmed["prompt_tokens"]  # type: ignore
    raw = oa.chat.completions.with_raw_response.create(
        model="smollm2-135m", messages=turn2, max_tokens=12, temperature=0, extra_headers={"x-session-id": "talk"}
    )
    second = raw.parse()
    assert raw.http_response.json()["headstart"]["path"] == "ready_exact"
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens
    assert second.choices[0].message.content == cold_text(oa, turn2, 12)
