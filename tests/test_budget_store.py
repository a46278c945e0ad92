"""Sessions that survive: the KV budget, eviction order, spill, the SQLite store, limits."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.errors import TooManySessions
from headstart.model import HFBackend
from headstart.session.evict import Eviction
from headstart.session.store import SCHEMA_VERSION, SchemaError, SessionStore
from tests.helpers import GREEDY, QUESTIONS, cold
from tests.kvmeter import KVMeter, held_kv_bytes

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
        with KVMeter(tiny, lambda: engine) as meter:
            for i in range(5):
                _turn(engine, f"s{i}", QUESTIONS[0])
            # A finished session holds less than its reservation (no sure tail, a short answer),
            # so two of them and a new request's reservation fit in 2.5 reservations: every
            # admission from the fourth on evicts exactly the least recently used session.
            evicted = [s.id for s in engine.list_sessions() if s.evicted]
            assert evicted == ["s0", "s1"]
            assert all(engine.get_session(f"s{i}").kv_ids for i in (2, 3, 4))
            assert held_kv_bytes(engine) <= budget
            # an evicted session keeps its transcript and answers, rebuilt cold
            messages, first = _turn(engine, "s0", QUESTIONS[0])
            assert first.path == "cold" and first.token_ids == cold(engine, messages, SHORT).token_ids
        assert meter.samples > 0 and meter.peak <= budget  # measured after every model call
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
    # 1.75, not 1.5: the budget holds whole KV blocks (rounded down) and a reservation takes
    # whole blocks (rounded up); still room for one session's turn, not for two sessions.
    budget = int(_tokens(probe, QUESTIONS[0], GREEDY) * real.info.kv_bytes_per_token * 1.75)
    config = EngineConfig(pre_position=False, kv_budget=budget, spill=True)
    engine = Engine(real, config=config, spill_dir=str(tmp_path / "spill")).start()
    try:
        with KVMeter(real, lambda: engine) as meter:
            messages, _ = _turn(engine, "a", QUESTIONS[0], GREEDY)
            _turn(engine, "b", QUESTIONS[0], GREEDY)
            assert engine.get_session("a").evicted and engine.sessions.evictions.spilled == 1
            messages = [*messages, {"role": "assistant", "content": engine.get_session("a").messages[-1]["content"]},
                        {"role": "user", "content": QUESTIONS[1]}]
            c = engine.generate(Request(messages=messages, params=GREEDY, session_id="a"))
        assert c.extra["reloaded_tokens"] > 0 and c.path == "session" and c.cached_tokens > 0
        assert engine.sessions.evictions.reloaded == 1
        assert c.token_ids == cold(engine, messages).token_ids
        assert meter.peak <= budget  # the reloaded KV came in within the budget too
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
    from headstart.errors import ContextTooLong

    engine = make_engine(tiny, max_context=64)
    messages = [{"role": "user", "content": "word " * 80}]
    prompt = len(engine.template.render(messages))
    assert prompt > 64
    with pytest.raises(ContextTooLong) as refused:
        engine.submit(Request(messages=messages, session_id="long"))
    numbers = re.findall(r"\d+", str(refused.value))
    assert str(prompt) in numbers and "64" in numbers  # the prompt's length and the limit


def test_a_request_waits_for_room_rather_than_break_the_budget(tiny: HFBackend) -> None:
    """Two requests that do not fit together: the second waits in the queue until the first
    finishes, and the first, the one being computed, is never evicted to make room."""
    probe = Engine(tiny, config=EngineConfig(pre_position=False))
    params = SamplingParams(max_tokens=40)
    reserve = _tokens(probe, QUESTIONS[0], params) * tiny.info.kv_bytes_per_token
    budget = int(reserve * 1.5)  # one request at a time fits, two do not
    engine = Engine(tiny, config=EngineConfig(pre_position=False, kv_budget=budget, spill=False)).start()
    registry = engine.sessions
    events: list[tuple[str, str, bool]] = []  # (what, session, was its request running)
    admit, release, evict = registry.admit, registry.release, registry.evict

    def observed_admit(s, need):  # type: ignore[no-untyped-def]
        ok = admit(s, need)
        events.append(("admitted" if ok else "waits", s.id, s.busy))
        return ok

    def observed_release(s):  # type: ignore[no-untyped-def]
        events.append(("released", s.id, s.busy))
        release(s)

    def observed_evict(ev):  # type: ignore[no-untyped-def]
        events.append((f"evicted {ev.kind}", ev.session.id, bool(ev.session.reserved)))
        evict(ev)

    registry.admit, registry.release, registry.evict = observed_admit, observed_release, observed_evict
    try:
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        with KVMeter(tiny, lambda: engine) as meter:
            first = engine.submit(Request(messages=messages, params=params, session_id="a"))
            second = engine.submit(Request(messages=messages, params=params, session_id="b"))
            a, b = first.result(), second.result()
        order = [(what, sid) for what, sid, _ in events if what != "waits"]
        # b was admitted only once a had finished and released its reservation; the only
        # eviction is a's KV, after a's request was done (never while it ran).
        assert order == [("admitted", "a"), ("released", "a"), ("evicted kv", "a"), ("admitted", "b"),
                         ("released", "b")], events
        assert ("waits", "b", True) in events
        assert not any(what.startswith("evicted") and running for what, _, running in events)
        assert meter.peak <= budget
        assert a.token_ids == b.token_ids == cold(engine, messages, params).token_ids
    finally:
        engine.stop()


def test_idle_work_never_evicts_real_state(tiny: HFBackend) -> None:
    """Pre-positioning that finds no room stops (NoRoom) rather than evict another
    session's KV, even when evicting it would make the room."""
    engine = Engine(tiny, config=EngineConfig(kv_budget=1 << 40, spill=False)).start()
    try:
        _turn(engine, "big", "word " * 600)  # real state worth far more than one ready position
        _turn(engine, "small", QUESTIONS[0])
        big, small = engine.get_session("big"), engine.get_session("small")
        assert "next" in small.ready
        wanted = small.ready_bytes()
        for s in (big, small):
            engine.sessions.evict(Eviction(s, "ready", s.ready_bytes()))
        held = list(big.kv_ids)
        assert len(held) * tiny.info.kv_bytes_per_token > wanted  # evicting big would make the room
        # Room for half of small's ready position, unless big's real state were evicted.
        engine.budget.limit = held_kv_bytes(engine) + wanted // 2
        with KVMeter(tiny, lambda: engine) as meter:
            engine.schedule_pre_position(small)
            assert engine.wait_idle(120)
        assert "next" not in small.ready  # the idle work gave up
        assert big.kv_ids == held and not big.evicted and engine.sessions.evictions.kv == 0
        assert meter.peak <= engine.budget.limit
    finally:
        engine.stop()


def test_the_counted_kv_is_the_memory_held(tiny: HFBackend) -> None:
    """What the budget counts is what the KV tensors' buffers hold: after pre-positioning
    parks a ready position and crops the session back to its entry, no dropped row may stay
    pinned in memory behind a view."""
    engine = Engine(tiny, config=EngineConfig(kv_budget=1 << 40, spill=False)).start()
    try:
        _turn(engine, "a", QUESTIONS[0])
        assert "next" in engine.get_session("a").ready  # parked, and the session cropped back
        counted = engine.sessions.resident_bytes()
        assert held_kv_bytes(engine, pinned=False) == counted  # the elements the tensors hold...
        assert held_kv_bytes(engine) == counted  # ...are all the memory behind them
    finally:
        engine.stop()
