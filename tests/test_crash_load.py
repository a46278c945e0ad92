"""Crash tests under load: clients stream turns while the server is SIGKILLed at a random
(seeded) moment, three times in a row, restarting on the same database each time.

After each kill: every acknowledged turn is in the store, no turn a client did not send is,
every stored session is whole, and after the restart each session's next turn equals a cold
computation of the same messages (greedy). A turn counts as acknowledged when its client got
the final chunk (the one with the ``headstart`` object), which the server sends only after the
commit. The one thing a server cannot promise is the reverse for the turn whose final chunk
was on the wire at the kill: it may be committed although its client never heard of it. Such a
turn is counted and reported (``in transit``) and must be the in-flight request's own messages
with a whole answer; the client's next request, which does not carry it, replaces it.
Bounded and loopback only: 4 clients, 8 sessions, 4-token answers.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from headstart.bench.serverproc import ServeProcess
from headstart.session.store import SessionStore

SEED = 20261201
CLIENTS = 4
SESSIONS = 8
KILLS = 3
MAX_TOKENS = 4
ASKS = ["Name a colour.", "Name a fruit.", "Say a number.", "Name an animal.", "Name a city.", "Say hi.",
        "Name a tree.", "One more, please."]

Messages = list[dict[str, str]]


@dataclass
class Conversations:
    """What the clients were told: each session's acknowledged messages, and the request each
    had on the wire when the server died."""

    acked: dict[str, Messages] = field(default_factory=lambda: {f"crash-{i}": [] for i in range(SESSIONS)})
    in_flight: dict[str, Messages] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def turns(self) -> int:
        return sum(len(m) // 2 for m in self.acked.values())


def stream_turn(url: str, sid: str, messages: Messages) -> str | None:
    """One streamed turn; its answer if acknowledged (the final chunk arrived), else None."""
    text, acknowledged = "", False
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"x-session-id": sid},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
            acknowledged = acknowledged or "headstart" in chunk
    return text if acknowledged else None


def client(url: str, sids: list[str], convs: Conversations, rng: random.Random, stop: threading.Event) -> None:
    """Turns on its sessions in turn until told to stop or the server dies."""
    while not stop.is_set():
        for sid in sids:
            with convs.lock:
                messages = [*convs.acked[sid], {"role": "user", "content": rng.choice(ASKS)}]
                convs.in_flight[sid] = messages
            try:
                answer = stream_turn(url, sid, messages)
            except httpx.HTTPError:
                return  # the server died under it: this turn stays in flight
            with convs.lock:
                if answer is None:
                    return
                convs.acked[sid] = [*messages, {"role": "assistant", "content": answer}]
                del convs.in_flight[sid]


def load_then_kill(server: ServeProcess, convs: Conversations, rng: random.Random) -> None:
    """Run the clients; SIGKILL the server at a random moment once this round has acknowledged
    a turn, and wait for the clients to notice."""
    stop = threading.Event()
    sids = sorted(convs.acked)
    start = convs.turns()
    threads = [threading.Thread(target=client, args=(server.url, sids[i::CLIENTS], convs,
                                                     random.Random(rng.random()), stop), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 600
    while convs.turns() == start:
        assert time.monotonic() < deadline, "no turn was acknowledged under load"
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 3.0))
    server.kill()  # asserts that SIGKILL is what ended it
    stop.set()
    for t in threads:
        t.join(180)
        assert not t.is_alive()


def check_store(db: Path, convs: Conversations) -> tuple[int, int]:
    """Every acknowledged turn stored, nothing else but turns in transit; (present, in transit)."""
    store = SessionStore(db)
    try:
        stored = {s.id: s for s in store.load_all()}
    finally:
        store.close()
    assert set(stored) <= set(convs.acked)
    present = in_transit = 0
    for sid, acked in convs.acked.items():
        s = stored.get(sid)
        messages = s.messages if s is not None else []
        if s is not None:
            assert s.turns == len(messages) // 2 and len(messages) % 2 == 0, (sid, s.turns, messages)
        if messages == acked:
            present += len(acked) // 2
            continue
        sent = convs.in_flight.get(sid)
        assert sent is not None and messages[:-1] == sent, f"{sid}: stored {messages}, acknowledged {acked}"
        assert messages[-1]["role"] == "assistant"
        present += len(acked) // 2
        in_transit += 1
    return present, in_transit


def check_next_turns(server: ServeProcess, convs: Conversations, rng: random.Random) -> None:
    """Each session's next turn equals the same messages computed cold (greedy)."""
    listed = httpx.get(f"{server.url}/v1/sessions", timeout=60).json()["data"]
    assert {s["id"] for s in listed} >= {sid for sid, m in convs.acked.items() if m}
    for sid in sorted(convs.acked):
        messages = [*convs.acked[sid], {"role": "user", "content": rng.choice(ASKS)}]
        in_session = server.chat(sid, messages, max_tokens=MAX_TOKENS)
        cold = server.chat(None, messages, max_tokens=MAX_TOKENS)
        assert in_session.status_code == 200 and cold.status_code == 200, (in_session.text, cold.text)
        answer = in_session.json()["choices"][0]["message"]["content"]
        assert answer == cold.json()["choices"][0]["message"]["content"], sid
        assert in_session.json()["headstart"]["path"] in ("ready_exact", "entry", "session", "cold")
        convs.acked[sid] = [*messages, {"role": "assistant", "content": answer}]
    convs.in_flight.clear()


def test_sigkill_under_load_three_times_loses_no_acknowledged_turn(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    convs = Conversations()
    args = ("--no-gate",)  # every path exact, so each next turn must equal the cold one
    server = ServeProcess(tmp_path, *args)
    report = []
    try:
        for kill in range(1, KILLS + 1):
            load_then_kill(server, convs, rng)
            acknowledged = convs.turns()
            present, in_transit = check_store(tmp_path / "h.db", convs)
            report.append(f"kill {kill}: {acknowledged} turns acknowledged before, {present} there after the "
                          f"restart, {acknowledged - present} lost, {in_transit} in transit")
            print(report[-1])
            assert present == acknowledged, report
            server = ServeProcess(tmp_path, *args)
            check_next_turns(server, convs, rng)
    finally:
        server.stop()
    print("\n".join(report))
