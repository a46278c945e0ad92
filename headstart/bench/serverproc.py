"""``headstart serve`` as a child process on a loopback port.

A benchmark that times a client must not share an interpreter lock with the server it
times, and a test that kills the server, starts a second one on the same data, or changes
what the kernel lets it write needs it in a process of its own. Both start it here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A loopback port nobody listens on (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 240, log: Path | None = None,
    path: str = "/health",
) -> None:
    """Poll ``url + path`` until it answers 200; fail at once if ``proc`` exits meanwhile
    (saying why, from ``log``), and after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            said = log.read_text() if log is not None and log.exists() else ""
            raise RuntimeError(f"the server exited with {proc.returncode}: {said}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not become healthy within {timeout} s")


class ServeProcess:
    """One ``headstart serve`` on ``data`` (``HEADSTART_DATA``): transcripts in ``db``
    (default ``data/h.db``; ``""`` for none), spilled KV in ``data/spill``, its log in
    ``data/server-PORT.log``. ``threads`` caps torch's threads (one by default: the machines
    that run it are shared, and a test may hold two servers); None leaves torch's choice."""

    def __init__(
        self, data: Path, *args: str, db: str | None = None, threads: int | None = 1, wait: bool = True,
        timeout: float = 240,
    ) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data / f"server-{self.port}.log"
        env = {**os.environ, "HEADSTART_DATA": str(data), "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        store = str(data / "h.db") if db is None else db
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "headstart.cli", "--log-level", "WARNING", "serve", "--port", str(self.port),
                 "--db", store, "--spill-dir", str(data / "spill"), *args],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 240) -> None:
        try:
            wait_healthy(self.url, self.proc, timeout, self.log)
        except RuntimeError:
            self.stop()
            raise

    def chat(
        self, sid: str | None, messages: list[dict[str, str]], max_tokens: int = 8, **extra: Any
    ) -> httpx.Response:
        """One greedy chat completion, in session ``sid`` (None: a one-off request)."""
        headers = {"x-session-id": sid} if sid else {}
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=300)

    def kill(self) -> None:
        """SIGKILL, and check that this is what ended it (not a graceful stop)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        if self.proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the server ended with {self.proc.returncode}, not of the SIGKILL")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
