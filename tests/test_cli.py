"""The command line: the terminal chat shows the state at work."""

from __future__ import annotations

import subprocess
import sys


def _chat_two_turns(*flags: str) -> None:
    """``headstart chat`` for two questions and an empty line: both answered, each followed by
    its status line; the second turn reuses the first's KV."""
    run = subprocess.run(
        [sys.executable, "-m", "headstart.cli", "--log-level", "WARNING", "chat", "--max-tokens", "12", *flags],
        input="What is the capital of France?\nAnd of Italy?\n\n",
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    status = [line for line in run.stderr.splitlines() if "ttft" in line]
    assert len(status) == 2
    assert status[0].strip().startswith("[cold") and "cached 0/" in status[0]
    assert not status[1].strip().startswith("[cold") and "cached 0/" not in status[1]


def test_terminal_chat_prints_answers_with_path_ttft_and_cache() -> None:
    _chat_two_turns()


def test_terminal_chat_talks_to_a_running_server(real) -> None:  # type: ignore[no-untyped-def]
    from tests.apiutil import serve

    with serve(real) as srv:
        _chat_two_turns("--url", srv.url, "--session", "from-cli")
        # The conversation lives in the server's session, not in the chat process.
        assert srv.engine.get_session("from-cli").turns == 2


def test_make_serve_passes_each_flag_once() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for args, expected in [
        ([], "--host 127.0.0.1 --port 8000"),
        (["PORT=8001", "ARGS=--port 9 --threads 1"], "--host 127.0.0.1 --port 9 --threads 1"),
        (["PORT=8001", "ARGS=--model qwen2.5-coder-0.5b"], "--host 127.0.0.1 --port 8001 --model qwen2.5-coder-0.5b"),
        (["ARGS=--host=0.0.0.0"], "--port 8000 --host=0.0.0.0"),
    ]:
        run = subprocess.run(["make", "-n", "-s", "-W", ".venv/.installed", "serve", *args], cwd=root,
                             capture_output=True, text=True, timeout=60)
        line = [x for x in run.stdout.replace("\\\n", " ").splitlines() if "headstart serve" in x][-1]
        assert " ".join(line.split("headstart serve", 1)[1].split()) == expected, line
