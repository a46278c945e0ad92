"""``headstart chat``: a terminal conversation that shows the session state at work.

After each answer it prints the time to first token, the path the request took and how
many prompt tokens came from cache, so the effect of idle-time work is visible: type
slowly and watch ``entry`` or ``gate`` replace ``session``. With ``--url`` it talks to a
running server through its OpenAI door (the session rides on ``x-session-id``); without,
it loads the model in this process. Ctrl-C during an answer stops it (in process the engine
ends it within a step; over HTTP closing the stream does) and asks again.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.engine.output import Completion, Delta


@dataclass
class Served:
    """What the status line shows about one answer."""

    text: str
    path: str
    ttft_ms: float
    cached: int
    prompt_tokens: int
    completion_tokens: int
    e2e_ms: float


# Sends the conversation; yields text pieces, then one Served.
Talker = Callable[[list[dict[str, str]]], Iterator["str | Served"]]


def in_process(args: argparse.Namespace, session_id: str) -> tuple[Talker, Callable[[], None], str]:
    from headstart.model import load
    from headstart.server.flags import engine_config, set_threads

    set_threads(args)
    print("loading the model...", file=sys.stderr)
    backend = load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    engine = Engine(backend, config=engine_config(args)).start()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)

    def talk(messages: list[dict[str, str]]) -> Iterator[str | Served]:
        completion: Completion | None = None
        handle = engine.submit(Request(messages=list(messages), params=params, session_id=session_id, stream=True))
        try:
            for item in handle:
                if isinstance(item, Delta):
                    yield item.text
                else:
                    completion = item
        finally:
            if completion is None:  # stopped: the engine ends the answer and keeps no turn of it
                handle.cancel()
                handle.result()
        assert completion is not None
        yield Served(completion.text, completion.path, completion.ttft_ms, completion.cached_tokens,
                     completion.prompt_tokens, completion.completion_tokens, completion.e2e_ms)

    return talk, engine.stop, f"{backend.info.name} on {backend.info.device}"


def over_http(args: argparse.Namespace, session_id: str) -> tuple[Talker, Callable[[], None], str]:
    import httpx

    headers = {"x-session-id": session_id}
    if args.api_key:
        headers["authorization"] = f"Bearer {args.api_key}"
    client = httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=600)
    models = client.get("/v1/models")
    if models.status_code != 200:
        raise SystemExit(f"{args.url}: GET /v1/models answered {models.status_code}: {models.text[:200]}")
    model = models.json()["data"][0]["id"]

    def talk(messages: list[dict[str, str]]) -> Iterator[str | Served]:
        body = {"model": model, "messages": messages, "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
        text, usage, ext = "", {}, {}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise SystemExit(f"the server answered {r.status_code}: {r.read().decode()[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise SystemExit(f"the server failed the request: {chunk['error']['message']}")
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        text += piece
                        yield piece
                usage = chunk.get("usage") or usage
                ext = chunk.get("headstart") or ext
        yield Served(text, ext.get("path", "?"), ext.get("ttft_ms", 0.0),
                     (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                     usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), ext.get("e2e_ms", 0.0))

    return talk, client.close, f"{model} at {args.url}"


def run_chat(args: argparse.Namespace) -> int:
    # Ctrl-C is how a user stops an answer, so it must work however the chat was started: a
    # parent that ignores or blocks SIGINT (a background job, a test runner) passes that on,
    # and Python installs no KeyboardInterrupt handler for an ignored SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    session_id = args.session or f"chat-{uuid.uuid4().hex[:8]}"
    talk, close, where = (over_http if args.url else in_process)(args, session_id)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"{where}, session {session_id}. Ctrl-C stops an answer; "
          "an empty line, Ctrl-D or Ctrl-C at the prompt quits.", file=sys.stderr)
    try:
        while True:
            try:
                text = _ask("you> ")
            except KeyboardInterrupt:
                break
            if not text:
                break
            messages.append({"role": "user", "content": text})
            print("bot> ", end="", flush=True)
            answer = talk(messages)
            try:
                served = _show(answer)
            except KeyboardInterrupt:
                # Stop this answer, wait for that, and ask again; a second Ctrl-C meanwhile quits.
                try:
                    answer.close()
                except KeyboardInterrupt:
                    break
                print("\n     [stopped]", file=sys.stderr)
                messages.pop()
                continue
            print()
            print(
                f"     [{served.path}  ttft {served.ttft_ms:.1f} ms  "
                f"cached {served.cached}/{served.prompt_tokens} tokens  "
                f"{served.completion_tokens} new tokens in {served.e2e_ms:.0f} ms]",
                file=sys.stderr,
            )
            messages.append({"role": "assistant", "content": served.text})
    finally:
        close()
    return 0


def _show(answer: Iterator[str | Served]) -> Served:
    """Print an answer as it comes; what the status line shows about it."""
    for item in answer:
        if isinstance(item, Served):
            return item
        print(item, end="", flush=True)
    raise RuntimeError("the answer ended without a completion")


def _ask(prompt: str) -> str:
    """The next line typed, stripped ("" at the end of input).

    Not ``input()``: a Ctrl-C may be delivered to any of the process's threads, and only the
    main thread acts on it, so a main thread blocked in a read would never see it. Waking
    every fraction of a second lets Python run the pending handler (KeyboardInterrupt)."""
    print(prompt, end="", flush=True)
    while not select.select([sys.stdin], [], [], 0.2)[0]:
        pass
    return sys.stdin.readline().strip()
