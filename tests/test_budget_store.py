"""Sessions that survive: the KV budget, eviction order, spill, the SQLite store, limits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from headstart.engine import Engine, EngineConfig, Request, TooManySessions
from headstart.model import HFBackend
from headstart.sampling import SamplingParams
from headstart.store import SCHEMA_VERSION, SchemaError, SessionStore
from tests.helpers import GREEDY, QUESTIONS, cold

SHORT = SamplingParams(max_tokens=6)


def _turn(engine: Engine, sid: str, question: str, params: SamplingParams = SHORT):
    messages = [{"role": "user", "content": question}]
    c = engine.generate(Request(messages=messages, params=params, session_id=sid))
    assert engine.wait_idle(120)
    return messages, c


def _tokens(engine: Engine, question: str, params: SamplingParams = SHORT) -> int:
    """The KV a one-turn session on ``question`` reserves while its request runs."""
    prompt = engine.template.render([{"role": "user", "content": question}])
    return len(prompt) + params.max_tokens + engine.config.forced_cap


def test_lru_sessions_are_evicted_and_the_budget_holds(tiny: HFBackend, tmp_path: Path) -> None:
    probe = Engine(tiny, config=EngineConfig(pre_position=False))
    per_session = _tokens(probe, QUESTIONS[0]) * tiny.info.kv_bytes_per_token
    budget = int(per_session * 2.5)
    engine = Engine(tiny, config=EngineConfig(pre_position=False, kv_budget=budget, spill=False)).start()
    try:
        for i in range(5):
            _turn(engine, f"s{i}", QUESTIONS[0])
        evicted = [s.id for s in engine.list_sessions() if s.evicted]
        assert len(evicted) >= 2
        assert evicted == [f"s{i}" for i in range(len(evicted))]  # least recently used first
        assert engine.get_session("s4").kv_ids and engine.get_session("s3").kv_ids
        assert engine.sessions.peak_resident <= budget
        assert engine.sessions.resident_bytes() <= budget
        # an evicted session keeps its transcript and answers, rebuilt cold
        messages, first = _turn(engine, "s0", QUESTIONS[0])
        assert first.path == "cold" and first.token_ids == cold(engine, messages, SHORT).token_ids
        assert engine.sessions.peak_resident <= budget
    finally:
        engine.stop()


def test_ready_positions_go_before_session_kv(tiny: HFBackend) -> None:
    engine = Engine(tiny, config=EngineConfig(kv_budget=1 << 40, spill=False)).start()
    try:
        _turn(engine, "old", QUESTIONS[0])
        _turn(engine, "new", QUESTIONS[1])
        old, new = engine.get_session("old"), engine.get_session("new")
        assert old.ready and new.ready
        # shrink the budget so that one more turn only fits without the old ready position
        used = engine.sessions.resident_bytes()
        engine.budget.limit = used - old.ready_bytes() // 2 + 8 * tiny.info.kv_bytes_per_token
        messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "x"},
                    {"role": "user", "content": "more"}]
        engine.generate(Request(messages=messages, params=SamplingParams(max_tokens=2), session_id="new"))
        assert not old.ready and old.kv_ids  # speculation went first, real state stayed
        assert engine.sessions.evictions.ready >= 1 and engine.sessions.evictions.kv == 0
    finally:
        engine.stop()


def test_spilled_kv_is_reloaded_instead_of_recomputed(real: HFBackend, tmp_path: Path) -> None:
    probe = Engine(real, config=EngineConfig(pre_position=False))
    # Room for one turn's reservation in whole KV blocks, not for two sessions.
    budget = int(_tokens(probe, QUESTIONS[0], GREEDY) * real.info.kv_bytes_per_token * 2)
    config = EngineConfig(pre_position=False, kv_budget=budget, spill=True)
    engine = Engine(real, config=config, spill_dir=str(tmp_path / "spill")).start()
    try:
        messages, _ = _turn(engine, "a", QUESTIONS[0], GREEDY)
        _turn(engine, "b", QUESTIONS[0], GREEDY)
        assert engine.get_session("a").evicted and engine.sessions.evictions.spilled == 1
        messages = [*messages, {"role": "assistant", "content": engine.get_session("a").messages[-1]["content"]},
                    {"role": "user", "content": QUESTIONS[1]}]
        c = engine.generate(Request(messages=messages, params=GREEDY, session_id="a"))
        assert c.extra["reloaded_tokens"] > 0 and c.path == "session" and c.cached_tokens > 0
        assert c.token_ids == cold(engine, messages).token_ids
        assert engine.sessions.peak_resident <= budget
    finally:
        engine.stop()


def test_transcripts_survive_a_restart(real: HFBackend, tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    engine = Engine(real, config=EngineConfig(pre_position=False), store=SessionStore(db)).start()
    messages: list[dict[str, str]] = []
    for q in QUESTIONS[:2]:
        messages.append({"role": "user", "content": q})
        c = engine.generate(Request(messages=list(messages), params=GREEDY, session_id="durable"))
        messages.append({"role": "assistant", "content": c.text})
    engine.get_session("durable").settings.hint = "a hint"
    engine.sessions.persist(engine.get_session("durable"))
    engine.stop()

    again = Engine(real, config=EngineConfig(pre_position=False), store=SessionStore(db)).start()
    try:
        s = again.get_session("durable")
        assert s.messages == messages and s.turns == 2 and s.settings.hint == "a hint"
        assert s.paths["cold"] == 1 and s.paths["session"] == 1
        nxt = [*messages, {"role": "user", "content": QUESTIONS[2]}]
        c = again.generate(Request(messages=nxt, params=GREEDY, session_id="durable"))
        assert c.path == "cold"  # no KV survived, the transcript did
        assert c.token_ids == cold(again, nxt).token_ids
    finally:
        again.stop()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "new.db"
    SessionStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError):
        SessionStore(db)


def test_session_limit_and_idle_expiry(tiny: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(tiny, pre_position=False, max_sessions=2, idle_expiry_s=100.0)
    _turn(engine, "one", "hi")
    engine.create_session("two")
    with pytest.raises(TooManySessions):
        engine.create_session("three")
    with pytest.raises(TooManySessions):
        engine.generate(Request(messages=[{"role": "user", "content": "x"}], params=SHORT, session_id="four"))
    one, two = engine.get_session("one"), engine.get_session("two")
    one.last_used -= 90
    two.last_used -= 200
    before = one.last_used
    _turn(engine, "one", "hi again")  # every request restarts the clock
    assert one.last_used >= before + 90
    assert engine.sessions.reap() == ["two"]
    assert [s.id for s in engine.list_sessions()] == ["one"]
    assert engine.sessions.evictions.expired == 1


def test_context_limit_names_both_lengths(tiny: HFBackend, make_engine: Callable[..., Engine]) -> None:
    from headstart.engine import ContextTooLong

    engine = make_engine(tiny, max_context=64)
    with pytest.raises(ContextTooLong, match="64"):
        engine.submit(Request(messages=[{"role": "user", "content": "word " * 80}], session_id="long"))


def test_a_request_waits_for_room_rather_than_break_the_budget(tiny: HFBackend) -> None:
    probe = Engine(tiny, config=EngineConfig(pre_position=False))
    params = SamplingParams(max_tokens=40)
    reserve = _tokens(probe, QUESTIONS[0], params) * tiny.info.kv_bytes_per_token
    budget = int(reserve * 1.5)  # one request at a time fits, two do not
    engine = Engine(tiny, config=EngineConfig(pre_position=False, kv_budget=budget, spill=False)).start()
    try:
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        first = engine.submit(Request(messages=messages, params=params, session_id="a"))
        second = engine.submit(Request(messages=messages, params=params, session_id="b"))
        a, b = first.result(), second.result()
        assert a.token_ids == b.token_ids
        # b was admitted only once a had finished and released its reservation
        assert b.foreground_wait_ms >= a.e2e_ms - 50
        assert engine.sessions.peak_resident <= budget
    finally:
        engine.stop()
