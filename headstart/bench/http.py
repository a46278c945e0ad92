"""``headstart bench --http``: time to first token as a client sees it, beside the server's.

The engine's ``ttft_ms`` counts from the moment the app received a request to the moment
the model chose the first token; ``first_chunk_ms`` (same start) to the moment the door
wrote the chunk carrying it to the socket. A client also waits for its own request
building, the connection, the HTTP parsing and its reading of the chunk. This runs a real
``headstart serve`` in a child process (so the client shares no interpreter lock with it)
and drives one ~1,500-token session through it with the official ``openai`` client and
with plain httpx (two turns each in turn), streaming: every other turn is a ``gate`` hit
(the server's threshold is 0, so a pre-positioned session always answers from its cached
distribution), and every other turn a ``ready_exact`` hit (the turn is sent to ``/warm``
first). Both clients are made once and reused, so every timed request is a warm client's.
For each request it records the time to the first content chunk at the client, how much of
it the openai client spent building the request before httpx sent it (an httpx request
hook), and the server's figures for the same request. It also times the openai client's
request building alone, over repeated calls of a warm client (the hook stops each request
before anything is sent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from headstart.bench.serverproc import ServeProcess
from headstart.stats import summary

_WORDS = ("module", "function", "returns", "value", "error", "test", "passes", "branch", "change", "review",
          "config", "the", "a", "of", "with", "when", "then", "before", "after", "input", "output", "file")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


def _settled(http: Any, sid: str, timeout: float = 300) -> None:
    """Wait until the session's idle-time work is done and its next position is parked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = http.get(f"/v1/sessions/{sid}").json()
        if not info["working"] and not info["busy"] and info["ready"]:
            return
        time.sleep(0.02)
    raise RuntimeError(f"session {sid} did not settle")


def _timed(client: Any, sid: str, messages: list[dict[str, str]], max_tokens: int, sent: list[float],
           ) -> dict[str, Any]:
    """One streamed request with the openai client: time to the first content chunk, of it
    the client's own time to build the request (until httpx sends it, ``sent`` being filled
    by the client's request hook), and the server's figures."""
    model = client.models.list().data[0].id  # the server's own name for its model (outside the timing)
    sent.clear()
    start = time.perf_counter()
    first = None
    text, extension = "", None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        extra_headers={"x-session-id": sid},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            text += chunk.choices[0].delta.content
        if chunk.model_extra and "headstart" in chunk.model_extra:
            extension = chunk.model_extra["headstart"]
    assert extension is not None, "the final chunk carries the headstart object"
    return {**_record("openai", start, sent[0], first, extension, text), "model": model}


def _timed_raw(http: Any, sid: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """The same request with plain httpx, the SSE lines read as they come: the client's
    own cost left out, what remains is the server's and the transport's."""
    model = http.get("/v1/models").json()["data"][0]["id"]
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    headers = {"x-session-id": sid, "content-type": "application/json"}
    start = time.perf_counter()
    first = None
    text, extension = "", None
    with http.stream("POST", "/v1/chat/completions", content=body, headers=headers) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                text += chunk["choices"][0]["delta"].get("content") or ""
            extension = chunk.get("headstart", extension)
    assert extension is not None, "the final chunk carries the headstart object"
    return {**_record("httpx", start, start, first, extension, text), "model": model}


def _record(kind: str, start: float, sent: float, first: float | None, extension: dict[str, Any],
            text: str) -> dict[str, Any]:
    client_ms = ((first or time.perf_counter()) - start) * 1000
    return {"client": kind, "path": extension["path"], "client_ttft_ms": client_ms,
            "build_ms": (sent - start) * 1000, "server_ttft_ms": extension["ttft_ms"],
            "first_chunk_ms": extension["first_chunk_ms"], "door_ms": extension["door_ms"],
            "queue_ms": extension["queue_ms"], "text": text}


class _Stop(Exception):
    """Raised by the request hook: the request was built, nothing is sent."""


def _build_cost(url: str, model: str, messages: list[dict[str, str]], repeat: int = 20) -> dict[str, Any]:
    """The openai client's own request building, per call of one warm client: from
    ``create()`` to the moment httpx would send (the hook stops it there)."""
    import httpx
    from openai import APIConnectionError, OpenAI

    marks: list[float] = []

    def stop(_: Any) -> None:
        marks.append(time.perf_counter())
        raise _Stop

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                    http_client=httpx.Client(event_hooks={"request": [stop]}))
    took = []
    for _ in range(repeat):
        start = time.perf_counter()
        with contextlib.suppress(_Stop, APIConnectionError):
            client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
                                           extra_headers={"x-session-id": "unused"})
        took.append((marks[-1] - start) * 1000)
    return {"first_ms": took[0], "warm": summary(took[1:]), "messages": len(messages)}


def run_http(args: argparse.Namespace) -> int:
    import logging

    import httpx
    from openai import OpenAI

    logging.getLogger("httpx").setLevel(logging.WARNING)
    rng = random.Random(args.seed)
    turns = args.turns or 8
    max_tokens = args.max_tokens or 8
    model = ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory() as data:
        print("starting headstart serve...", file=sys.stderr)
        server = ServeProcess(Path(data), "--gap-threshold", "0", "--temperature", "0", *model, db="",
                              threads=args.threads, timeout=600)
        url = server.url
        try:
            sent: list[float] = []
            hooked = httpx.Client(timeout=600, event_hooks={"request": [lambda _: sent.append(time.perf_counter())]})
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=hooked)
            http = httpx.Client(base_url=url, timeout=600)
            sid = "http-bench"
            # ~1,500 tokens: a system prompt and a few long turns of an agent-like session.
            messages: list[dict[str, str]] = [{"role": "system", "content": _text(rng, 300)}]
            for _ in range(3):
                messages += [{"role": "user", "content": _text(rng, 200)},
                             {"role": "assistant", "content": _text(rng, 120)}]
            messages.append({"role": "user", "content": "Summarise the change in one line."})
            records = [{**_timed(client, sid, messages, max_tokens, sent), "turn": 0}]
            for turn in range(1, 2 * turns + 1):
                messages = [*messages, {"role": "assistant", "content": records[-1]["text"]},
                            {"role": "user", "content": f"Next step {turn}: {_text(rng, 8)}"}]
                _settled(http, sid)
                if turn % 2 == 0:  # a warmed turn: the exact request is prefilled first
                    r = http.post(f"/v1/sessions/{sid}/warm",
                                  json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
                    r.raise_for_status()
                # Each path through both clients in turn: the openai client, then plain httpx.
                if (turn - 1) // 2 % 2 == 0:
                    record = _timed(client, sid, messages, max_tokens, sent)
                else:
                    record = _timed_raw(http, sid, messages, max_tokens)
                records.append({**record, "turn": turn})
                print(f"turn {turn}: {record['path']} ({record['client']})", file=sys.stderr)
            info = http.get(f"/v1/sessions/{sid}").json()
            report = _report(records, info["tokens"])
            report["render_ms"] = _render_cost(args.model, messages)
            report["openai_build_ms"] = _build_cost(url, records[0]["model"], messages)
        finally:
            server.stop()
    print(_markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps({"records": records, "report": report}, indent=2))
    return 0


def _render_cost(model: str | None, messages: list[dict[str, str]], repeat: int = 20) -> dict[str, float | None]:
    """The door's biggest part, side by side: rendering and tokenising the last request in
    full, and with the session's previous rendering cached (what the server does)."""
    from transformers import AutoTokenizer

    from headstart.model.loader import local_folder, resolve
    from headstart.session.template import ChatTemplate, RenderCache

    template = ChatTemplate(AutoTokenizer.from_pretrained(local_folder(resolve(model))))
    held = RenderCache()
    template.render(messages[:-2], cache=held)  # the previous request, as the session rendered it
    full, cached = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        expect = template.render(messages)
        full.append((time.perf_counter() - t0) * 1000)
        cache = RenderCache()
        cache.last = held.last
        t0 = time.perf_counter()
        got = template.render(messages, cache=cache)
        cached.append((time.perf_counter() - t0) * 1000)
        assert got == expect, "a cached rendering differs from the full one"
    return {"full_p50": summary(full)["p50"], "cached_p50": summary(cached)["p50"]}


def _report(records: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {"session_tokens": tokens, "rows": []}
    for path in sorted({r["path"] for r in records}):
        for kind in ("openai", "httpx"):
            rs = [r for r in records if r["path"] == path and r["client"] == kind]
            if not rs:
                continue
            out["rows"].append({
                "path": path, "client": kind, "n": len(rs),
                "client_ttft_ms": summary([r["client_ttft_ms"] for r in rs]),
                "build_ms": summary([r["build_ms"] for r in rs]),
                # The client's figure less its own request building: from the moment httpx
                # sends the request (its hook) to the first content chunk read.
                "from_send_ms": summary([r["client_ttft_ms"] - r["build_ms"] for r in rs]),
                "first_chunk_ms": summary([r["first_chunk_ms"] for r in rs]),
                "server_ttft_ms": summary([r["server_ttft_ms"] for r in rs]),
                "client_minus_first_chunk_ms": summary([r["client_ttft_ms"] - r["first_chunk_ms"] for r in rs]),
                "client_minus_server_ms": summary([r["client_ttft_ms"] - r["server_ttft_ms"] for r in rs]),
                "door_ms": summary([r["door_ms"] for r in rs]),
                "queue_ms": summary([r["queue_ms"] for r in rs]),
            })
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"session of {report['session_tokens']} tokens; streaming over loopback (p50s, ms)", "",
             "| path | client | n | client TTFT | of it, client builds request | from send (client TTFT - building) | "
             "server first_chunk_ms | server ttft_ms | client - first_chunk_ms | client - ttft_ms | door_ms | "
             "queue_ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cols = ("client_ttft_ms", "build_ms", "from_send_ms", "first_chunk_ms", "server_ttft_ms",
            "client_minus_first_chunk_ms", "client_minus_server_ms", "door_ms", "queue_ms")
    for row in report["rows"]:
        lines.append(f"| {row['path']} | {row['client']} | {row['n']} | "
                     + " | ".join(f"{row[c]['p50']:.2f}" for c in cols) + " |")
    r = report.get("render_ms")
    if r:
        lines += ["", f"rendering + tokenising the last request: full {r['full_p50']:.2f} ms, with the session's "
                      f"cached rendering {r['cached_p50']:.2f} ms ({r['cached_p50'] / r['full_p50']:.2f} of full)"]
    b = report.get("openai_build_ms")
    if b:
        lines += [f"openai client building one request of {b['messages']} messages (nothing sent): first call "
                  f"{b['first_ms']:.2f} ms, later calls of the same client p50 {b['warm']['p50']:.2f} ms"]
    return "\n".join(lines)
