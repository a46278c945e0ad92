"""Where a warmed turn's TTFT goes in the engine, stage by stage (issue 12's 1,000-token session).

    python scripts/ttft_stages.py [--rounds 7] [--context 1000] [--threads 2]

Runs the engine figures' setup (``bench/model_only.py``'s ``warmed_turns``: a ``ready_exact``
hit and a streamed ``gate`` answer per round) with the stages of each request timed by
wrapping the functions that mark them, and prints the median milliseconds of each stage per
path: from ``Engine.submit``'s entry through rendering, tokenising, the rest of the door's
checks, the queue, the step's start (run by the submitting thread itself when no step is
under way), the path's own work, to the first token. A measuring tool, not a test: its
wrappers add a few microseconds per stage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from headstart.bench.model_only import warmed_turns
from headstart.engine import engine as engine_mod
from headstart.engine import loop
from headstart.engine.engine import Engine, EngineConfig
from headstart.model import load
from headstart.session import book, template

_marks: list[tuple[str, float]] = []  # the current request's (stage, moment)
_door: threading.Thread | None = None  # the thread that submitted it
_open = False


def mark(stage: str) -> None:
    if _open:
        _marks.append((stage, time.perf_counter()))


def wrap(owner: Any, name: str, before: str | None, after: str | None, door_only: bool = False) -> None:
    """Mark ``before`` as ``owner.name`` is called and ``after`` as it returns."""
    fn = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        mine = not door_only or threading.current_thread() is _door
        if before and mine:
            mark(before)
        out = fn(*args, **kwargs)
        if after and mine:
            mark(after)
        return out

    setattr(owner, name, wrapped)


def instrument() -> None:
    real_submit = Engine.submit

    def submit(self: Engine, req: Any, loop_: Any = None) -> Any:
        global _door, _open
        _marks.clear()
        _door, _open = threading.current_thread(), True
        mark("entry")
        return real_submit(self, req, loop_)

    Engine.submit = submit  # type: ignore[method-assign]
    wrap(template.ChatTemplate, "render_text", None, "rendered", door_only=True)
    wrap(template.ChatTemplate, "render", None, "tokenised", door_only=True)
    wrap(loop.Scheduler, "submit", "handed", None)
    real_advance = loop.Scheduler._advance

    def advance(self: loop.Scheduler, job: loop.Job, *args: Any, **kwargs: Any) -> Any:
        if job.started is None and job in self._running and not any(s == "woken" for s, _ in _marks):
            mark("woken")
        return real_advance(self, job, *args, **kwargs)

    loop.Scheduler._advance = advance  # type: ignore[method-assign]
    wrap(book.KVBook, "restore", "matched", "adopted")
    wrap(engine_mod.Engine, "_serve_gate", "matched", None)
    real_first = engine_mod._Emitter._first

    def first(self: Any) -> None:
        global _open
        real_first(self)
        mark("first token")
        _open = False

    engine_mod._Emitter._first = first  # type: ignore[method-assign]


ORDER = ["entry", "rendered", "tokenised", "handed", "woken", "matched", "adopted", "first token"]
LABELS = {
    "rendered": "render (chat template)",
    "tokenised": "tokenise (or the render cache's look-up)",
    "handed": "the door's checks, the chooser, the queue",
    "woken": "the step's start: admission (by the door when no step is under way)",
    "matched": "the ready position found",
    "adopted": "its fork adopted",
    "first token": "the first token chosen",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    instrument()
    backend = load()
    engine = Engine(backend, config=EngineConfig(gate=True, gap_threshold=float("inf"))).start()
    stages: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ttft: dict[str, list[float]] = defaultdict(list)
    runs: list[list[tuple[str, float]]] = []
    real_generate = engine.generate

    def generate(req: Any) -> Any:
        c = real_generate(req)
        runs.append(list(_marks))
        return c

    engine.generate = generate  # type: ignore[method-assign]
    load_before = os.getloadavg()
    try:
        turns = warmed_turns(engine, args.context, rounds=args.rounds + 1)
    finally:
        engine.stop()
    load_after = os.getloadavg()
    pairs = list(zip(turns, runs[1:], strict=True))[2:]  # runs[0]: the session's first turn; round 1 warms up
    for (_, c), marks in pairs:
        ttft[c.path].append(c.ttft_ms)
        seen = dict(marks)
        prev = seen["entry"]
        for stage in ORDER[1:]:
            if stage in seen:
                stages[c.path][stage].append((seen[stage] - prev) * 1000)
                prev = seen[stage]
    print(f"{turns[0][1].prompt_tokens}-token session, {args.rounds} rounds, load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    paths = list(ttft)
    print(f"| stage (median ms) | {' | '.join(paths)} |")
    print("| --- |" + " --- |" * len(paths))
    for stage in ORDER[1:]:
        cells = [f"{statistics.median(stages[p][stage]):.3f}" if stages[p].get(stage) else "" for p in paths]
        print(f"| {LABELS[stage]} | {' | '.join(cells)} |")
    print(f"| TTFT (engine's own) | {' | '.join(f'{statistics.median(ttft[p]):.3f}' for p in paths)} |")


if __name__ == "__main__":
    main()
