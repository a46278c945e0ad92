"""``headstart serve`` as a real subprocess on a loopback port, for tests that kill it,
start a second one on the same data, or change what the kernel lets it write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port


class Server:
    """One ``headstart serve`` process on ``data/h.db`` (and ``data/spill``)."""

    def __init__(self, data: Path, *args: str, wait: bool = True) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data / f"server-{self.port}.log"
        # One torch thread: these machines are shared, and a test may hold two servers.
        env = {"OMP_NUM_THREADS": "1", **os.environ, "HEADSTART_DATA": str(data), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "headstart.cli", "--log-level", "WARNING", "serve", "--port", str(self.port),
                 "--db", str(data / "h.db"), "--spill-dir", str(data / "spill"), *args],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}): {self.log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become healthy")

    def chat(
        self, sid: str | None, messages: list[dict[str, str]], max_tokens: int = 8, **extra: Any
    ) -> httpx.Response:
        headers = {"x-session-id": sid} if sid else {}
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=300)

    def kill(self) -> None:
        """SIGKILL, and check that this is what ended it."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
