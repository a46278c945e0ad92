"""When the database cannot be written, nothing is acknowledged: requests that need a durable
write get a 503 in the OpenAI error shape, and the server recovers once writes work again.

The failure is the kernel's, not a mock: the running server's file-size limit is set to 0
(``prlimit``), so every write it makes to a file fails with EFBIG, as on a full disk, and
SQLite reports a disk I/O error; raising the limit again is the disk being freed.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import httpx

from headstart.bench.serverproc import ServeProcess
from headstart.session.store import SessionStore


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "store_unavailable"
    assert "could not be written" in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_store_that_cannot_be_written_acknowledges_nothing_and_recovers(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, "--no-gate", "--no-pre-position")
    sessions = f"{server.url}/v1/sessions"
    try:
        first = [{"role": "user", "content": "Name a colour."}]
        r = server.chat("w", first)
        assert r.status_code == 200
        acknowledged = [*first, r.json()["choices"][0]["message"]]
        assert httpx.post(sessions, json={"id": "feed"}, timeout=60).status_code == 200
        assert httpx.post(f"{sessions}/feed/push", json={"entries": ["kept"]}, timeout=60).status_code == 200

        _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (0, hard))  # the disk is full
        second = [*acknowledged, {"role": "user", "content": "Name another one."}]
        _refused(server.chat("w", second))
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"x-session-id": "w"}, timeout=300,
                          json={"messages": second, "max_tokens": 8, "temperature": 0, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "store_unavailable"  # in-band, after the text, as OpenAI does
        assert not any(e.get("choices") and e["choices"][0]["finish_reason"] for e in events[:-1])
        assert not any("headstart" in e for e in events)  # never told it succeeded
        _refused(server.chat("brand-new", first))
        _refused(httpx.post(sessions, json={"id": "made"}, timeout=60))
        _refused(httpx.post(f"{sessions}/feed/push", json={"entries": ["lost"]}, timeout=60))
        _refused(httpx.post(f"{sessions}/feed/queries", json={"id": "q", "question": "Any news?"}, timeout=60))
        _refused(httpx.delete(f"{sessions}/feed", timeout=60))
        # None of it happened.
        assert httpx.get(f"{sessions}/w", timeout=30).json()["turns"] == 1
        assert httpx.get(f"{sessions}/brand-new", timeout=30).status_code == 404
        assert httpx.get(f"{sessions}/made", timeout=30).status_code == 404
        feed = httpx.get(f"{sessions}/feed", timeout=30).json()
        assert (feed["pushed"], feed["queries"]) == (1, 0)

        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again
        r = server.chat("w", second)
        assert r.status_code == 200
        acknowledged = [*second, r.json()["choices"][0]["message"]]
        assert httpx.post(f"{sessions}/feed/push", json={"entries": ["later"]}, timeout=60).status_code == 200
    finally:
        server.kill()
    stored = {s.id: s for s in SessionStore(tmp_path / "h.db").load_all()}
    assert set(stored) == {"w", "feed"}
    assert stored["w"].messages == [{"role": m["role"], "content": m["content"]} for m in acknowledged]
    assert stored["w"].turns == 2
    feed_data = stored["feed"].state["data"]  # pending, or already ingested into the messages
    texts = "\n".join([t for t, _ in feed_data["entries"]] + [m["content"] for m in stored["feed"].messages])
    assert "kept" in texts and "later" in texts and "lost" not in texts and feed_data["pushed"] == 2
    assert stored["feed"].state["queries"] == []
