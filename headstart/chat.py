"""``headstart chat``: a terminal conversation that shows the session state at work.

After each answer it prints the time to first token, the path the request took and how
many prompt tokens came from cache, so the effect of idle-time work is visible: type
slowly and watch ``entry`` or ``gate`` replace ``session``.
"""

from __future__ import annotations

import argparse
import select
import sys

from headstart.engine import Engine, Request
from headstart.handle import Completion, Delta, Handle
from headstart.sampling import SamplingParams


def run_chat(args: argparse.Namespace) -> int:
    from headstart.cli import engine_config
    from headstart.model import load

    print("loading the model...", file=sys.stderr)
    backend = load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    engine = Engine(backend, config=engine_config(args)).start()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    print(f"{backend.info.name} on {backend.info.device}. Ctrl-C stops an answer; "
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
            handle = engine.submit(Request(messages=list(messages), params=params, session_id="chat", stream=True))
            print("bot> ", end="", flush=True)
            try:
                completion = _show(handle)
            except KeyboardInterrupt:
                # Stop this answer (the engine ends it within a step and keeps no turn of
                # it), wait for that, and ask again; a second Ctrl-C meanwhile quits.
                handle.cancel()
                try:
                    handle.result()
                except KeyboardInterrupt:
                    break
                print("\n     [stopped]", file=sys.stderr)
                messages.pop()
                continue
            print()
            print(
                f"     [{completion.path}  ttft {completion.ttft_ms:.1f} ms  "
                f"cached {completion.cached_tokens}/{completion.prompt_tokens} tokens  "
                f"{completion.completion_tokens} new tokens in {completion.e2e_ms:.0f} ms]",
                file=sys.stderr,
            )
            messages.append({"role": "assistant", "content": completion.text})
    finally:
        engine.stop()
    return 0


def _show(handle: Handle) -> Completion:
    """Print an answer as it comes; its completion."""
    for item in handle:
        if isinstance(item, Delta):
            print(item.text, end="", flush=True)
        else:
            return item
    raise RuntimeError("the engine ended a request without a completion")


def _ask(prompt: str) -> str:
    """The next line typed, stripped ("" at the end of input).

    Not ``input()``: a Ctrl-C may be delivered to any of the process's threads, and only the
    main thread acts on it, so a main thread blocked in a read would never see it. Waking
    every fraction of a second lets Python run the pending handler (KeyboardInterrupt)."""
    print(prompt, end="", flush=True)
    while not select.select([sys.stdin], [], [], 0.2)[0]:
        pass
    return sys.stdin.readline().strip()
