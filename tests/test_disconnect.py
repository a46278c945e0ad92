"""A client that gives up on a non-streamed answer (chat, generate, warm) stops the work
done for it within a step: the session is free at once and no turn is committed."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from headstart.engine.output import Completion
from headstart.idle.job import WARM_KEY
from headstart.model import HFBackend
from tests.apiutil import Served, serve, wait_until

LONG = [{"role": "user", "content": "Count from one to five hundred, one number per line, in words."}]


@pytest.fixture(scope="module")
def served(real: HFBackend) -> Iterator[Served]:
    with serve(real, engine={"pre_position": False}) as s:
        yield s


def _completions(served: Served) -> list[Completion]:
    seen: list[Completion] = []
    served.engine.observers.append(seen.append)
    return seen


def test_a_chat_client_that_times_out_frees_its_session_and_commits_nothing(served: Served) -> None:
    seen = _completions(served)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", headers={"x-session-id": "quitter"}, timeout=3,
                   json={"messages": LONG, "max_tokens": 400, "temperature": 0})
    wait_until(lambda: not served.engine.get_session("quitter").busy and seen, timeout=120)
    s = served.engine.get_session("quitter")
    assert seen[-1].finish_reason == "cancelled" and seen[-1].completion_tokens < 400
    assert s.turns == 0 and s.messages == []  # the answer nobody received is not a turn
    r = served.client.post("/v1/chat/completions", headers={"x-session-id": "quitter"},
                           json={"messages": LONG, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200  # not 409: the session is free
    assert served.engine.get_session("quitter").turns == 1


def test_a_generate_client_that_times_out_stops_its_generation(served: Served) -> None:
    seen = _completions(served)
    assert served.client.post("/v1/sessions", json={"id": "asker"}).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/sessions/asker/generate", timeout=3,
                   json={"prompt": LONG[0]["content"], "max_tokens": 400, "temperature": 0})
    wait_until(lambda: not served.engine.get_session("asker").busy and seen, timeout=120)
    assert seen[-1].finish_reason == "cancelled" and seen[-1].completion_tokens < 400
    assert served.client.get("/v1/sessions/asker").json()["busy"] is False


def test_a_warm_client_that_times_out_cancels_the_warm(served: Served) -> None:
    engine = served.engine
    assert served.client.post("/v1/sessions", json={"id": "warmer"}).status_code == 200
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 150}]
    prompt = engine.template.render(messages)
    before = engine.stream_stats.warm_cancelled
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/sessions/warmer/warm", timeout=1, json={"messages": messages})
    s = engine.get_session("warmer")
    wait_until(lambda: s.warm_ticket is None and not engine.scheduler.has_background("warmer"), timeout=120)
    assert WARM_KEY not in s.ready  # nothing parked for a client that left
    assert len(s.kv_ids) < len(prompt)  # and it stopped warming part way
    assert engine.stream_stats.warm_cancelled == before + 1
