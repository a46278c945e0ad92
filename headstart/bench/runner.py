"""Drive a workload through one mode: client threads, real idle gaps, one record per request.

Each client thread runs its share of the sessions one after another; within a session it
sleeps the scripted gap, sends the next request and waits for the answer, so several
sessions are in flight at once and one session's idle-time work competes with the others'
requests on the single model thread. The times come from the engine's own clock
(arrival at the engine to first token, to end), which is what a door adds nothing to.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from headstart.bench.clients import run_threads
from headstart.bench.modes import ModeSpec
from headstart.bench.workloads import Script, Step, Workload
from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.engine.output import Completion
from headstart.model.backend import Backend

Message = dict[str, Any]


@dataclass
class Record:
    """What one request did, in one mode."""

    mode: str
    session: str
    step: int
    kind: str
    path: str
    ttft_ms: float
    decided_ms: float
    e2e_ms: float
    queue_ms: float  # arrival to the request's first step on the model thread
    background_wait_ms: float  # of which spent behind background chunks
    prompt_tokens: int
    cached_tokens: int
    tokens: list[int]
    text: str
    finish_reason: str
    gap_s: float
    settle_ms: float
    arrival_s: float
    logit_gap: float | None = None
    speculative: bool = False
    verified: bool | None = None
    answer: str | None = None  # the chosen candidate of a fast_answer request
    truth: str | None = None
    candidates: list[str] | None = None
    shadow: dict[str, Any] | None = None
    overlapped: bool = False  # in flight while another session's request was

    @property
    def key(self) -> tuple[str, int]:
        return self.session, self.step

    def first_token(self) -> int | str | None:
        """What the gate decides: the candidate for a fast_answer, else the first token."""
        if self.answer is not None:
            return self.answer
        return self.tokens[0] if self.tokens else None

    def gate_answer(self) -> str | None:
        """The candidate the gate gave (gate path) or would have given (a shadow verdict)."""
        if self.path == "gate":
            return self.answer
        if self.shadow is not None and self.candidates:
            return self.candidates[int(self.shadow["choice"])]
        return None


@dataclass
class ModeRun:
    """All records of one mode plus what its engine counted."""

    name: str
    description: str
    exact: bool
    records: list[Record]
    wall_s: float
    background: dict[str, int]
    gate: dict[str, Any]
    pairs: list[tuple[float, bool]]
    extra: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[int], None]


def merge(a: ModeRun | None, b: ModeRun) -> ModeRun:
    """One mode's runs over several rounds of sessions, as one run."""
    if a is None:
        return b

    def add(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
        out = dict(x)
        for k, v in y.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = add(out[k], v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k in out and k not in _KEEP:
                out[k] = out[k] + v
            else:
                out[k] = v
        return out

    records = sorted(a.records + b.records, key=lambda r: (r.session, r.step))
    return ModeRun(a.name, a.description, a.exact, records, a.wall_s + b.wall_s, add(a.background, b.background),
                   add(a.gate, b.gate), a.pairs + b.pairs, add(a.extra, b.extra))


_KEEP = {"threshold", "capacity"}  # settings, not counts: never summed


def _wait_for_session(engine: Engine, session_id: str, settle: bool, timeout: float = 600.0) -> None:
    """Until the session takes requests (its last answer's tail work is done) and, with
    ``settle``, until its idle-time work is finished too. Seen calm twice in a row, so a
    job that is being handed from the request to the background queue is not missed."""
    s = engine.get_session(session_id)
    calm = 0
    deadline = time.monotonic() + timeout
    while calm < 2 and time.monotonic() < deadline:
        busy = s.busy or (settle and engine.scheduler.has_background(session_id))
        calm = 0 if busy else calm + 1
        time.sleep(0.002 if calm else 0.01)


def request_for(spec: ModeSpec, script: Script, step: Step, messages: list[Message]) -> Request:
    return Request(
        messages=list(messages),
        params=SamplingParams(max_tokens=step.max_tokens),
        session_id=script.id if spec.sessions else None,
        fast_answer=list(step.fast_answer) if step.fast_answer else None,
        tools=list(script.tools) if script.tools else None,
        stream=True,  # the benchmark reads each answer as it is made, as a streaming client does
    )


def answered(step_messages: tuple[Message, ...], call_ids: list[str]) -> list[Message]:
    """A step's messages with tool results tied to the calls the last answer made."""
    out = []
    for m in step_messages:
        if m.get("role") == "tool" and call_ids:
            m = {**m, "tool_call_id": call_ids[0]}
        out.append(m)
    return out


def reply(c: Completion) -> Message:
    """The answer as the next request sends it back: with its tool calls, if it made any."""
    message: Message = {"role": "assistant", "content": c.text}
    if c.tool_calls:
        message["tool_calls"] = [call.message() for call in c.tool_calls]
    return message


def _drive(
    engine: Engine,
    spec: ModeSpec,
    workload: Workload,
    script: Script,
    t0: float,
    sink: list[Record],
    lock: threading.Lock,
    progress: Progress | None,
) -> None:
    messages: list[Message] = [{"role": "system", "content": script.system}] if script.system else []
    call_ids: list[str] = []
    for i, step in enumerate(script.steps):
        time.sleep(step.gap_s)
        waited = time.perf_counter()
        if spec.sessions:
            _wait_for_session(engine, script.id, settle=workload.gaps.settle and spec.pre_positions)
        settle_ms = (time.perf_counter() - waited) * 1000
        # A stream step's readings (all but its last message) travel with its question here;
        # with the sessions API they would be pushed as they arrive and taken in while idle,
        # and the registered question (the session hint set in run_mode) re-evaluated.
        messages.extend(answered(step.messages, call_ids))
        arrival = time.perf_counter() - t0
        c = engine.submit(request_for(spec, script, step, messages)).result()
        messages.append(reply(c))
        call_ids = [call.id for call in c.tool_calls or []]
        rec = Record(
            mode=spec.name,
            session=script.id,
            step=i,
            kind=step.kind,
            path=c.path,
            ttft_ms=c.ttft_ms,
            decided_ms=c.decided_ms,
            e2e_ms=c.e2e_ms,
            queue_ms=c.foreground_wait_ms,
            background_wait_ms=c.background_wait_ms,
            prompt_tokens=c.prompt_tokens,
            cached_tokens=c.cached_tokens,
            tokens=list(c.token_ids),
            text=c.text,
            finish_reason=c.finish_reason,
            gap_s=step.gap_s,
            settle_ms=settle_ms,
            arrival_s=arrival,
            logit_gap=c.logit_gap,
            speculative=c.speculative,
            verified=c.verified,
            answer=step.fast_answer[c.candidate] if step.fast_answer and c.candidate is not None else None,
            truth=step.truth,
            candidates=list(step.fast_answer) if step.fast_answer else None,
            shadow=c.extra.get("shadow"),
        )
        with lock:
            sink.append(rec)
        if progress is not None:
            progress(1)


def run_clients(
    workload: Workload,
    clients: int,
    drive: Callable[[Script, list[Record], threading.Lock], None],
) -> tuple[list[Record], float]:
    """Run ``drive`` for every session, ``clients`` sessions at a time; re-raise the first
    failure of any client."""
    records: list[Record] = []
    lock = threading.Lock()
    shares = [workload.sessions[c :: max(1, clients)] for c in range(max(1, clients))]

    def client(scripts: tuple[Script, ...]) -> None:
        for script in scripts:
            drive(script, records, lock)

    wall = run_threads([functools.partial(client, share) for share in shares if share])
    records.sort(key=lambda r: (r.session, r.step))
    mark_overlaps(records)
    return records, wall


def mark_overlaps(records: list[Record]) -> None:
    """Flag requests that shared the model with another session's request: they take turns
    step by step, so their times grow for reasons that are not their mode's."""
    spans = sorted((r.arrival_s, r.arrival_s + r.e2e_ms / 1000, i) for i, r in enumerate(records))
    for a, (_, end, i) in enumerate(spans):
        for start2, _, j in spans[a + 1 :]:
            if start2 >= end:
                break
            if records[i].session != records[j].session:
                records[i].overlapped = records[j].overlapped = True


def warm_up(backend: Backend) -> None:
    """One short generation so first-call allocations land outside every timed run."""
    engine = Engine(backend).start()
    try:
        engine.generate(Request(messages=[{"role": "user", "content": "Hello"}], params=SamplingParams(max_tokens=4)))
        engine.wait_idle(120)
    finally:
        engine.stop()


def run_mode(
    backend: Backend, spec: ModeSpec, workload: Workload, clients: int, progress: Progress | None = None
) -> ModeRun:
    """The workload through a fresh engine configured as ``spec``."""
    engine = Engine(backend, config=spec.config).start()
    try:
        if spec.sessions:
            for script in workload.sessions:
                s = engine.create_session(script.id)
                if spec.query and script.query:
                    s.settings.hint = script.query
        t0 = time.perf_counter()

        def drive(script: Script, sink: list[Record], lock: threading.Lock) -> None:
            _drive(engine, spec, workload, script, t0, sink, lock, progress)

        records, wall = run_clients(workload, clients, drive)
        # Outside the timed part: let work still queued finish, so what it computed is counted.
        engine.wait_idle(600)
        snap = engine.stats.snapshot()
        bg = dict(snap["background_tokens"])
        counters = engine.gate.counters
        gate = {
            "enabled": spec.config.gate,
            "threshold": spec.config.gap_threshold,
            "fires": counters.fires,
            "verified": counters.verified,
            "false_accepts": counters.false_accepts,
            "declined": counters.declined,
        }
        extra: dict[str, Any] = {"forward_calls": snap["forward_calls"], "errors": snap["errors"]}
        if engine.prefix_cache is not None:
            pc = engine.prefix_cache
            extra["prefix_cache"] = {
                "blocks": len(pc),
                "capacity": pc.capacity,
                "hit_tokens": pc.hit_tokens,
                "evicted": pc.evicted,
            }
        return ModeRun(spec.name, spec.description, spec.exact, records, wall, bg, gate, engine.gate.pairs(), extra)
    finally:
        engine.stop()
