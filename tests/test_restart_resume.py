"""After a ``kill -9`` and a restart, sessions restored from the store take up their idle-time
work by themselves: pushed data is ingested and registered questions are answered again,
with no request touching the session."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from headstart.bench.serverproc import ServeProcess
from headstart.engine import sessions as sessionapi
from headstart.engine.engine import Engine, EngineConfig
from headstart.idle import queries
from headstart.model import HFBackend
from headstart.session.store import SessionStore
from tests.apiutil import SSEReader

QUESTION = "Is the latest inlet temperature above 28 C? Answer Yes or No."


def test_an_engine_started_on_a_store_takes_up_its_sessions_work(tiny: HFBackend, tmp_path: Path) -> None:
    config = EngineConfig(pre_position=False)
    before = Engine(tiny, config=config, store=SessionStore(tmp_path / "h.db"))  # never started: does nothing
    s = sessionapi.open_session(before, "feed", None)
    sessionapi.add_query(before, s, QUESTION, query_id="hot", fast_answer=["Yes", "No"])
    sessionapi.push(before, s, sessionapi.measure(before, s, ["reading 1: inlet 27.5 C", "reading 2: 29.1 C"]))
    before.stop()

    engine = Engine(tiny, config=config, store=SessionStore(tmp_path / "h.db")).start()
    try:
        assert engine.wait_idle(120)
        s = engine.get_session("feed")
        assert s.data.waiting == 0 and s.data.counters()["ingested"] == 2 and s.data.version == 1
        assert queries.get(s, "hot").fresh(s) and queries.get(s, "hot").value in ("Yes", "No")
        assert s.turns == 0  # no request ran on it
    finally:
        engine.stop()


def test_restored_sessions_ingest_and_answer_after_a_kill(tmp_path: Path) -> None:
    entries = [f"reading {i}: inlet {20 + (i * 7) % 11}.{i % 10} C" for i in range(12)]
    first = ServeProcess(tmp_path)
    try:
        base = f"{first.url}/v1/sessions"
        assert httpx.post(base, json={"id": "feed"}, timeout=60).status_code == 200
        r = httpx.post(f"{base}/feed/queries", json={"id": "hot", "question": QUESTION,
                                                     "fast_answer": ["Yes", "No"]}, timeout=60)
        assert r.status_code == 200
        assert httpx.post(f"{base}/feed/push", json={"entries": entries}, timeout=60).status_code == 200
    finally:
        first.kill()  # at once: the batch is not ingested yet

    stored = {s.id: s for s in SessionStore(tmp_path / "h.db").load_all()}["feed"]
    waiting = len(stored.state["data"]["entries"])
    assert waiting > 0, "the first server ingested everything before the kill: nothing left to resume"
    assert [q["id"] for q in stored.state["queries"]] == ["hot"]

    with ServeProcess(tmp_path) as second:
        session = f"{second.url}/v1/sessions/feed"
        # Only reads from here on: an event stream and GETs, which never schedule work.
        with SSEReader(f"{session}/events") as events:
            deadline = time.monotonic() + 600
            answered = None
            while answered is None and time.monotonic() < deadline:
                info = httpx.get(session, timeout=30).json()
                query = httpx.get(f"{session}/queries/hot", timeout=30).json()
                if info["pending"] == 0 and query["fresh"] and query["data_version"] == info["data_version"]:
                    answered = query
                time.sleep(0.2)
            assert answered is not None, f"the restored session did no idle-time work: {info} {query}"
        assert info["ingested"] == len(entries) and info["data_version"] >= 1
        assert answered["value"] in ("Yes", "No")
        seen = []
        while not events.events.empty():
            seen.append(events.events.get_nowait())
        print("events after the restart:", [name for name, _ in seen])
        assert all(d["value"] in ("Yes", "No") for name, d in seen if name == "query_answered")
        assert info["turns"] == 0 and info["paths"] == {}  # no request ran on the session
