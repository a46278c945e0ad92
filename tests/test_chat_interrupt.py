"""``headstart chat``: Ctrl-C during an answer stops it and asks again; Ctrl-C at the
prompt quits with status 0."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time


class Chat:
    """The terminal chat as a subprocess, its output read as it comes."""

    def __init__(self) -> None:
        # faulthandler: a chat that does not exit is aborted and its threads' stacks shown
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "headstart.cli", "--log-level", "WARNING", "chat", "--max-tokens", "400",
             "--no-pre-position"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.text = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while ch := self.proc.stdout.read(1):
            self.out.put(ch)

    def until(self, predicate, timeout: float = 300) -> str:  # type: ignore[no-untyped-def]
        """Read output until ``predicate(all output so far)`` holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            assert time.monotonic() < deadline, f"no such output; got {self.text!r}"
            try:
                self.text += self.out.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, f"the chat exited ({self.proc.returncode}): {self.text!r}"
        return self.text

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def test_ctrl_c_stops_the_answer_then_quits_cleanly() -> None:
    chat = Chat()
    try:
        chat.until(lambda t: t.endswith("you> "))
        chat.say("Count from one to five hundred, one number per line, in words.")
        # Some of the answer is out (a few characters past the "bot> " marker): interrupt it.
        chat.until(lambda t: "bot> " in t and len(t.split("bot> ", 1)[1]) > 12)
        chat.proc.send_signal(signal.SIGINT)
        chat.until(lambda t: t.count("you> ") == 2)  # back at the prompt
        chat.say("What is the capital of France?")
        chat.until(lambda t: t.count("you> ") == 3)  # answered, and asking again
        chat.proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt
        try:
            chat.proc.wait(120)
        except subprocess.TimeoutExpired:
            chat.proc.send_signal(signal.SIGABRT)
            chat.proc.wait(30)
            stacks = chat.proc.stderr.read() if chat.proc.stderr else ""
            raise AssertionError(f"the chat did not exit after Ctrl-C at the prompt:\n{stacks[-8000:]}") from None
        assert chat.proc.returncode == 0
        stderr = chat.proc.stderr.read() if chat.proc.stderr else ""
    finally:
        if chat.proc.poll() is None:
            chat.proc.kill()
    assert "[stopped]" in stderr and "Traceback" not in stderr and "terminate called" not in stderr, stderr
    second = chat.text.split("you> ")[2]
    assert "Paris" in second
    status = [line for line in stderr.splitlines() if "ttft" in line]
    assert len(status) == 1  # the stopped answer reports no completion of its own
