"""The sessions API below HTTP: the data queue, the window, ingestion, registered questions and
warm turns on the engine itself (tiny model), each checked against a cold computation."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from headstart.decode.sampling import SamplingParams
from headstart.engine import sessions as sessionapi
from headstart.engine.engine import Engine, Request
from headstart.errors import BadRequest
from headstart.idle.ingest import DataFeed, Entry, fit_window, ingest_batch, window_limit
from headstart.model import HFBackend
from headstart.session.template import ChatTemplate, encode_candidates


def entries(*texts: str) -> list[Entry]:
    return [Entry(t, 1) for t in texts]


def test_feed_drops_the_oldest_waiting_entries_and_keeps_the_batch_in_flight() -> None:
    feed = DataFeed(max_pending=3)
    assert feed.push(entries("a", "b")).dropped == 0
    batch = feed.take(budget=100)
    assert [e.text for e in batch] == ["a", "b"] and feed.waiting == 2
    r = feed.push(entries("c", "d", "e", "f"))
    # pending (the batch in flight included) never exceeds max_pending: room for one more, so
    # "c", "d" and "e" are dropped; the batch in flight is never dropped.
    assert (r.pushed, r.dropped, r.pending) == (4, 3, 3)
    assert [e.text for e in feed.take(budget=100)] == ["a", "b"]  # interrupted: the same batch again
    assert feed.commit() == 1
    assert [e.text for e in feed.take(budget=100)] == ["f"]
    feed.commit()
    assert feed.counters() == {"data_version": 2, "pending": 0, "pushed": 6, "ingested": 3, "dropped": 3,
                               "max_pending": 3}


def test_feed_batches_by_token_budget() -> None:
    feed = DataFeed(max_pending=10)
    feed.push([Entry("x", 40), Entry("y", 40), Entry("z", 40)])
    assert [e.text for e in feed.take(budget=90)] == ["x", "y"]
    feed.commit()
    feed.push([Entry("big", 500)])
    assert [e.text for e in feed.take(budget=90)] == ["z"]
    feed.commit()
    assert [e.text for e in feed.take(budget=90)] == ["big"]  # always at least one


def test_window_drops_oldest_non_system_messages(tiny: HFBackend) -> None:
    template = ChatTemplate(tiny.tokenizer)
    messages = [{"role": "system", "content": "keep me"}] + [
        {"role": "user", "content": f"entry {i} " + "word " * 20} for i in range(10)
    ]
    full = len(template.entry(messages, "user"))
    limit = full // 2
    kept, dropped = fit_window(template, messages, None, limit)
    assert kept[0] == messages[0] and kept[-1] == messages[-1] and kept == [messages[0], *messages[1 + dropped:]]
    assert len(template.entry(kept, "user")) <= limit * 3 // 4
    fewer = [messages[0], *messages[dropped:]]  # one more message: over three quarters
    assert len(template.entry(fewer, "user")) > limit * 3 // 4
    assert fit_window(template, messages, None, full) == (messages, 0)
    assert window_limit(4096, 512, None) == 3584 and window_limit(4096, 512, 1000) == 1000


def test_ingest_invalidates_the_old_prediction(tiny: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(tiny)
    s = sessionapi.open_session(engine, "ing", None, system="Log.")
    assert engine.wait_idle(60) and "next" in s.ready
    s.data.push(entries("new data"))
    steps = ingest_batch(engine.book, engine.template, s, 3000, 16)
    for _ in steps:  # the engine is idle: drive the job here
        pass
    assert s.data.version == 1 and "next" not in s.ready
    assert s.kv_ids == engine.template.entry(s.messages, "user")


def test_fast_answer_candidates_are_refused_alike_by_a_request_and_a_registered_question(
    tiny: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    template = ChatTemplate(tiny.tokenizer)
    assert encode_candidates(template, ["yes", "no"]) == [template.encode("yes"), template.encode("no")]
    engine = make_engine(tiny, pre_position=False)
    s = sessionapi.open_session(engine, "fa", None, system="Answer.")
    hi = [{"role": "user", "content": "Is it?"}]
    for bad in ([], ["yes", ""]):
        with pytest.raises(BadRequest) as direct:
            encode_candidates(template, bad)
        with pytest.raises(BadRequest) as asked:
            engine.submit(Request(messages=hi, params=SamplingParams(max_tokens=1), fast_answer=bad))
        with pytest.raises(BadRequest) as registered:
            sessionapi.add_query(engine, s, "Is it?", max_tokens=1, fast_answer=bad)
        assert str(direct.value) == str(asked.value) == str(registered.value)
        assert direct.value.param == asked.value.param == registered.value.param == "fast_answer"
    assert s.queries == {}  # a refused question is not registered


def test_query_answer_and_its_cache_hit_equal_a_cold_computation(
    tiny: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(tiny, pre_position=False)
    s = sessionapi.open_session(engine, "qa", None, system="Answer.")
    q = sessionapi.add_query(engine, s, "Status?", max_tokens=5)
    sessionapi.push(engine, s, sessionapi.measure(engine, s, ["all good", "still good"]))
    assert engine.wait_idle(60) and q.fresh(s) and q.data_version == 1
    messages = [*s.messages, {"role": "user", "content": "Status?"}]
    cold = engine.generate(Request(messages=messages, params=SamplingParams(max_tokens=5)))
    assert q.token_ids == cold.token_ids[: len(q.token_ids)] and len(q.token_ids) == min(5, len(cold.token_ids))
    handle, version = sessionapi.ask(engine, s, "Status?", SamplingParams(max_tokens=5), owner=None)
    hit = handle.result()
    assert (hit.path, version, hit.extra["forwards_before_first_token"]) == ("ready_exact", 1, 0)
    assert hit.token_ids == cold.token_ids
    assert engine.wait_idle(60) and s.messages == messages[:-1]  # the question left no trace
    assert f"query:{q.id}" in s.ready  # and its answer stays parked for the next ask


def test_warm_parks_an_exact_ready_position(tiny: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(tiny, pre_position=False)
    s = engine.create_session("w")
    messages = [{"role": "user", "content": "Warm me up."}]
    ticket = sessionapi.warm(engine, s, Request(messages=messages))
    result = ticket.future.result(60)
    assert result["status"] == "warmed" and result["warmed_tokens"] == result["prompt_tokens"]
    assert sessionapi.warm(engine, s, Request(messages=messages)).future.result(60)["status"] == "covered"
    params = SamplingParams(max_tokens=6)
    c = engine.generate(Request(messages=messages, params=params, session_id="w"))
    assert c.path == "ready_exact" and c.extra["forwards_before_first_token"] == 0
    assert c.token_ids == engine.generate(Request(messages=messages, params=params)).token_ids
