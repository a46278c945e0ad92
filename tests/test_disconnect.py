"""A client that gives up on its answer (chat, generate, warm; streamed or not) stops the
work done for it within a step, even in the middle of a chunked prefill: the session is
free at once, its reservation goes back, and no turn is committed."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.engine.output import Completion
from headstart.idle.job import WARM_KEY
from headstart.model import HFBackend
from headstart.session.book import Need
from tests.apiutil import Served, serve, wait_until
from tests.helpers import cold

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


def test_a_prefill_cancelled_after_its_first_chunk_stops_there_and_leaves_the_session_exact(
    tiny: HFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop checks a request's cancel flag every step before it gives it budget: a long
    prompt whose client left computes no chunk after the one in flight, gives its KV
    reservation back, and the session answers its next turn as a cold computation does."""
    engine = Engine(tiny, config=EngineConfig(pre_position=False, gate=False, step_tokens=16))
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20}]
    params = SamplingParams(max_tokens=8)
    carried: list[set[str]] = []  # the sessions each forward computed rows for
    run = engine.book.run

    def spy(pieces: list[tuple[Need, int]]) -> list:
        carried.append({need.session.id for need, _ in pieces})
        return run(pieces)

    monkeypatch.setattr(engine.book, "run", spy)
    free = engine.pool.available()
    handle = engine.submit(Request(messages=messages, params=params, session_id="quits"))
    s = engine.get_session("quits")
    loop = engine.scheduler  # not started: the test drives it one step at a time
    assert loop._step()
    assert len(s.kv_ids) == 16 and s.reserved is not None and s.busy  # its first chunk
    handle.cancel()
    for _ in range(100):  # to its end, however it ends
        if loop.idle():
            break
        loop._step()
    c = handle.completion  # delivered on the model thread (this one), no writer to wait for
    assert c is not None and c.finish_reason == "cancelled" and c.token_ids == [] and c.extra["forwards"] == 1
    assert carried == [{"quits"}]  # no forward after the cancel carried its rows
    assert loop.idle() and not s.busy and s.reserved is None
    assert s.kv_ids == [] and engine.pool.available() == free  # back to what the turn found
    assert s.messages == [] and s.turns == 0  # nothing committed
    engine.start()
    try:
        again = engine.generate(Request(messages=messages, params=params, session_id="quits"))
        assert again.token_ids == cold(engine, messages, params).token_ids
        follow = [*messages, {"role": "assistant", "content": again.text}, {"role": "user", "content": "More."}]
        nxt = engine.generate(Request(messages=follow, params=params, session_id="quits"))
        assert nxt.path == "session" and nxt.token_ids == cold(engine, follow, params).token_ids
    finally:
        engine.stop()


def test_a_streaming_client_that_leaves_during_a_long_prefill_is_cancelled_within_a_step(served: Served) -> None:
    engine = served.engine
    assert engine.wait_idle(120)
    seen = _completions(served)
    messages = [{"role": "user", "content": "The committee met on Tuesday to review the budget. " * 180}]
    prompt = len(engine.template.render(messages))
    chunks = -(-prompt // engine.scheduler.step_tokens)  # the steps its whole prefill takes
    assert chunks >= 12
    before = engine.stats.forward_calls
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
    model = served.client.get("/v1/models").json()["data"][0]["id"]
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                            stream=True, extra_headers={"x-session-id": "leaver"})
    wait_until(lambda: engine.stats.forward_calls > before, timeout=120)  # its prefill is under way
    stream.close()
    left_at = engine.stats.forward_calls - before  # its forwards when it left (it runs alone)
    wait_until(lambda: bool(seen) and not engine.get_session("leaver").busy, timeout=120)
    c = seen[-1]
    assert c.session_id == "leaver" and c.finish_reason == "cancelled" and c.token_ids == []
    # At most the step in flight when the client left and the one that began as the door
    # heard of it: nothing like the rest of the prefill.
    assert c.extra["forwards"] <= left_at + 2 < chunks
    s = engine.get_session("leaver")
    assert s.reserved is None and s.kv_ids == [] and s.turns == 0
