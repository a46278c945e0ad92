"""``headstart bench --http``: time to first token as a client sees it, beside the server's.

The engine's ``ttft_ms`` counts from the moment the app received a request; a client also
waits for its own request building, the connection, the HTTP parsing and the SSE flush.
This runs a real ``headstart serve`` in a child process (so the client shares no
interpreter lock with it) and drives one ~1,500-token session through it with the
official ``openai`` client, streaming: every other turn is a ``gate`` hit (the server's
threshold is 0, so a pre-positioned session always answers from its cached distribution),
and every other turn a ``ready_exact`` hit (the turn is sent to ``/warm`` first). For each
request it records the time to the first content chunk at the client and the
``headstart`` object's ``ttft_ms`` of the same request.
"""

from __future__ import annotations

import argparse
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


def _timed(client: Any, sid: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed request: client time to the first content chunk, and the server's figures."""
    model = client.models.list().data[0].id  # the server's own name for its model (outside the timing)
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
    client_ms = ((first or time.perf_counter()) - start) * 1000
    return {"path": extension["path"], "client_ttft_ms": client_ms, "server_ttft_ms": extension["ttft_ms"],
            "door_ms": extension.get("door_ms"), "queue_ms": extension.get("queue_ms"), "text": text}


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
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            http = httpx.Client(base_url=url, timeout=600)
            sid = "http-bench"
            # ~1,500 tokens: a system prompt and a few long turns of an agent-like session.
            messages: list[dict[str, str]] = [{"role": "system", "content": _text(rng, 300)}]
            for _ in range(3):
                messages += [{"role": "user", "content": _text(rng, 200)},
                             {"role": "assistant", "content": _text(rng, 120)}]
            messages.append({"role": "user", "content": "Summarise the change in one line."})
            records = [{**_timed(client, sid, messages, max_tokens), "turn": 0}]
            for turn in range(1, 2 * turns + 1):
                messages = [*messages, {"role": "assistant", "content": records[-1]["text"]},
                            {"role": "user", "content": f"Next step {turn}: {_text(rng, 8)}"}]
                _settled(http, sid)
                if turn % 2 == 0:  # a warmed turn: the exact request is prefilled first
                    r = http.post(f"/v1/sessions/{sid}/warm",
                                  json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
                    r.raise_for_status()
                records.append({**_timed(client, sid, messages, max_tokens), "turn": turn})
                print(f"turn {turn}: {records[-1]['path']}", file=sys.stderr)
            info = http.get(f"/v1/sessions/{sid}").json()
            report = _report(records, info["tokens"])
            report["render_ms"] = _render_cost(args.model, messages)
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
    out: dict[str, Any] = {"session_tokens": tokens, "paths": {}}
    for path in sorted({r["path"] for r in records}):
        rs = [r for r in records if r["path"] == path]
        client = summary([r["client_ttft_ms"] for r in rs])
        server = summary([r["server_ttft_ms"] for r in rs])
        gap = summary([r["client_ttft_ms"] - r["server_ttft_ms"] for r in rs])
        out["paths"][path] = {"n": len(rs), "client_ttft_ms": client, "server_ttft_ms": server,
                              "client_minus_server_ms": gap,
                              "door_ms": summary([r["door_ms"] for r in rs if r["door_ms"] is not None])}
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"session of {report['session_tokens']} tokens; streaming over loopback with the openai client",
             "", "| path | n | client TTFT p50 (ms) | server ttft_ms p50 | client - server p50 | client/server | "
             "door_ms p50 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for path, p in report["paths"].items():
        c, s = p["client_ttft_ms"]["p50"], p["server_ttft_ms"]["p50"]
        lines.append(f"| {path} | {p['n']} | {c:.2f} | {s:.2f} | {p['client_minus_server_ms']['p50']:.2f} | "
                     f"{c / s if s else float('inf'):.2f} | {p['door_ms']['p50']:.2f} |")
    r = report.get("render_ms")
    if r:
        lines += ["", f"rendering + tokenising the last request: full {r['full_p50']:.2f} ms, with the session's "
                      f"cached rendering {r['cached_p50']:.2f} ms ({r['cached_p50'] / r['full_p50']:.2f} of full)"]
    return "\n".join(lines)
