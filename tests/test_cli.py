"""The command line: the terminal chat shows the state at work."""

from __future__ import annotations

import subprocess
import sys


def test_terminal_chat_prints_answers_with_path_ttft_and_cache() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "headstart.cli", "--log-level", "WARNING", "chat", "--max-tokens", "12"],
        input="What is the capital of France?\nAnd of Italy?\n\n",
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    status = [line for line in run.stderr.splitlines() if "ttft" in line]
    assert len(status) == 2
    assert status[0].strip().startswith("[cold") and "cached 0/" in status[0]
    assert not status[1].strip().startswith("[cold") and "cached 0/" not in status[1]
