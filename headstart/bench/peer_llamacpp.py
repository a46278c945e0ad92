"""A real peer side by side: llama.cpp's OpenAI-compatible server on the same GGUF.

The server (``python -m llama_cpp.server`` from ``llama-cpp-python[server]``, the
``peer`` extra) runs as a child process with its RAM prompt cache on, so a session's
next request reprocesses only the suffix that differs from a cached prompt: llama.cpp's
``cache_prompt``. The same workload then runs over HTTP with the same clients and gaps.
TTFT is measured at the client, from sending the request to the first streamed content,
so it includes the loopback HTTP hop the in-process modes do not pay (a millisecond or
so here, small beside a prefill).

A ``fast_answer`` question has no equivalent in llama.cpp; it is asked with one token to
generate and a logit bias that confines the choice to the candidates' first tokens, which
is the same decision made by a full forward pass.

The server may run from another interpreter (``--peer-python``): its dependencies pin a
FastAPI/Starlette that need not match headstart's, so a separate virtual environment is
the easy way to install it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from headstart.bench.runner import ModeRun, Progress, Record, run_clients
from headstart.bench.serverproc import free_port, wait_healthy
from headstart.bench.workloads import Script, Workload
from headstart.session.template import ChatTemplate

NAME = "llamacpp"
INSTALL_HINT = (
    "pip install 'headstart[peer]' (builds llama-cpp-python from source, ~10 min on 2 cores), "
    "or point --peer-python at an interpreter that has llama-cpp-python[server]"
)


def unavailable(python: str) -> str | None:
    """Why the peer cannot run with ``python``, or None when it can."""
    try:
        done = subprocess.run(
            [python, "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"llama-cpp-python[server] is not importable by {python} ({last})"
    return None


def version(python: str) -> str:
    done = subprocess.run(
        [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True, timeout=120
    )
    return done.stdout.strip()


class LlamaCppServer:
    """The llama.cpp server as a child process, up until the context exits."""

    def __init__(self, gguf: Path, python: str = sys.executable, n_ctx: int = 4096, threads: int | None = None,
                 cache_bytes: int = 2 << 30) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            python, "-m", "llama_cpp.server",
            "--model", str(gguf),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(n_ctx),
            # Both thread counts: prompt processing otherwise takes every core, which collapses
            # when the machine is shared.
            "--n_threads", str(threads or os.cpu_count() or 1),
            "--n_threads_batch", str(threads or os.cpu_count() or 1),
            "--cache", "True", "--cache_type", "ram", "--cache_size", str(cache_bytes),
            "--verbose", "False",
            # One request at a time, as the in-process engine; by default a new request cuts off the one
            # being streamed, which leaves concurrent sessions with empty answers.
            "--interrupt_requests", "False",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.description = (
            f"llama.cpp server (llama-cpp-python {version(python)}) over HTTP, same GGUF, RAM prompt cache"
        )
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"headstart-llamacpp-{self.port}.log"

    def __enter__(self) -> LlamaCppServer:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, self.proc, timeout=300, log=self.log, path="/v1/models")
        except RuntimeError:
            self.__exit__()
            raise
        # One request outside every timed part, as the in-process modes are warmed up.
        with httpx.Client() as c:
            _ask(c, self.url, {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0})
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ask(client: Any, url: str, body: dict[str, Any]) -> tuple[str, float, float]:
    """Stream one chat completion: (text, ms to first content, ms to the end)."""
    sent = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"llama.cpp server answered {r.status_code}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(text)
    end = time.perf_counter()
    return "".join(parts), ((first or end) - sent) * 1000, (end - sent) * 1000


def converse(server: LlamaCppServer, template: ChatTemplate, questions: list[str],
             max_tokens: int) -> list[tuple[float, float, int]]:
    """One session's greedy turns, each sent once the last is answered: per turn (ms to the first
    content, ms to the end, output tokens counted with the model's tokenizer)."""
    import httpx

    messages: list[dict[str, Any]] = []
    out = []
    with httpx.Client() as client:
        for q in questions:
            messages.append({"role": "user", "content": q})
            text, ttft, e2e = _ask(client, server.url, {"messages": messages, "max_tokens": max_tokens,
                                                        "temperature": 0})
            messages.append({"role": "assistant", "content": text})
            out.append((ttft, e2e, len(template.encode(text))))
    return out


def run_peer(
    server: LlamaCppServer,
    workload: Workload,
    template: ChatTemplate,
    clients: int,
    progress: Progress | None = None,
) -> ModeRun:
    """The workload against llama.cpp's server, as one more mode."""
    import httpx

    t0 = time.perf_counter()

    def drive(script: Script, sink: list[Record], lock: threading.Lock) -> None:
        messages: list[dict[str, Any]] = [{"role": "system", "content": script.system}] if script.system else []
        with httpx.Client() as client:
            for i, step in enumerate(script.steps):
                time.sleep(step.gap_s)
                messages.extend(step.messages)
                body: dict[str, Any] = {"messages": messages, "max_tokens": step.max_tokens, "temperature": 0}
                if step.fast_answer:
                    firsts = {template.encode(c)[0] for c in step.fast_answer}
                    body.update(max_tokens=1, logit_bias={str(t): 100.0 for t in firsts})
                arrival = time.perf_counter() - t0
                text, ttft, e2e = _ask(client, server.url, body)
                answer = None
                if step.fast_answer:
                    answer = next((c for c in step.fast_answer if text and c.startswith(text)), None)
                    text = answer or text
                messages.append({"role": "assistant", "content": text})
                rec = Record(
                    mode=NAME, session=script.id, step=i, kind=step.kind, path=NAME,
                    ttft_ms=ttft, decided_ms=ttft, e2e_ms=e2e, queue_ms=0.0, background_wait_ms=0.0,
                    prompt_tokens=len(template.render(messages[:-1])), cached_tokens=0,
                    tokens=template.encode(text) if text else [], text=text, finish_reason="stop",
                    gap_s=step.gap_s, settle_ms=0.0, arrival_s=arrival, answer=answer, truth=step.truth,
                )
                with lock:
                    sink.append(rec)
                if progress is not None:
                    progress(1)

    records, wall = run_clients(workload, clients, drive)
    empty = {"computed": 0, "reused": 0, "wasted": 0}
    gate = {"enabled": False, "threshold": None, "fires": 0, "verified": 0, "false_accepts": 0, "declined": 0}
    return ModeRun(NAME, server.description, False, records, wall, empty, gate, [], {})
