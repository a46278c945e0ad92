"""One server at a time on a database: a second one is refused at start, naming the holder;
a holder that died (even by SIGKILL) leaves no claim behind."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import pytest

from headstart.bench.serverproc import ServeProcess
from headstart.session.ownership import Claimed
from headstart.session.store import SessionStore


def test_a_store_is_claimed_by_one_process_at_a_time(tmp_path: Path) -> None:
    first = SessionStore(tmp_path / "h.db")
    with pytest.raises(Claimed) as refused:
        SessionStore(tmp_path / "h.db")
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(refused.value)
    first.close()
    SessionStore(tmp_path / "h.db").close()  # released: the next one may open it


def test_a_second_server_on_the_same_database_exits_naming_the_holder(tmp_path: Path) -> None:
    with ServeProcess(tmp_path) as holder:
        assert holder.chat("mine", [{"role": "user", "content": "Name a colour."}]).status_code == 200
        for data in (tmp_path, tmp_path / "other"):  # the same database; then only the same spill folder
            data.mkdir(exist_ok=True)
            args = () if data == tmp_path else ("--db", str(data / "own.db"), "--spill-dir", str(tmp_path / "spill"))
            second = ServeProcess(data, *args, wait=False)
            assert second.proc.wait(120) != 0
            message = second.log.read_text()
            assert f"pid {holder.proc.pid} on {socket.gethostname()}, started " in message, message
            assert ("the database" if data == tmp_path else "the spill folder") in message
            assert "Traceback" not in message
        # The holder goes on serving its session, which nobody else wrote to.
        r = holder.chat("mine", [{"role": "user", "content": "Name a colour."}])
        assert r.status_code == 200 and r.json()["headstart"]["path"] != "cold"


def test_a_restart_after_the_holder_was_killed_is_not_blocked(tmp_path: Path) -> None:
    dead = ServeProcess(tmp_path)
    try:
        r = dead.chat("kept", [{"role": "user", "content": "Name a fruit."}])
        assert r.status_code == 200
        answer = r.json()["choices"][0]["message"]["content"]
    finally:
        dead.kill()
    lock = tmp_path / "h.db.lock"
    assert json.loads(lock.read_text())["pid"] == dead.proc.pid  # the dead holder's record is still there
    with ServeProcess(tmp_path) as restarted:
        got = httpx.get(f"{restarted.url}/v1/sessions/kept", timeout=30).json()
        assert got["turns"] == 1 and got["messages"] == 2
        assert json.loads(lock.read_text())["pid"] == restarted.proc.pid
    stored = {s.id: s for s in SessionStore(tmp_path / "h.db").load_all()}
    assert stored["kept"].messages[-1] == {"role": "assistant", "content": answer}
