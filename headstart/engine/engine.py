"""The engine: sessions, the choice of path for each request, and generation.

Every request is rendered in full and compared token by token with what its session
holds; the path it takes is decided from that comparison and the session's ready
positions (see DESIGN.md for the five paths). All model work runs as jobs on the
scheduler's single thread; this module never blocks a door on the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from headstart.config import (
    ATTENTION,
    BACKGROUND_CHUNK,
    CONTEXT_RESERVE,
    CONTINUATION_CAP,
    FORCED_CAP,
    GATE_CONFIDENCE,
    GATE_TARGET,
    GATE_WINDOW,
    IDLE_EXPIRY_S,
    KV_BLOCK,
    LINEAR,
    MAX_PENDING,
    MAX_QUERIES,
    MAX_SESSIONS,
    PREDICTOR,
    SURE_GAP,
)
from headstart.decode.grammar import GrammarError, GrammarMatcher, Grammars
from headstart.decode.logits import Chooser, TokenLogprob
from headstart.decode.sampling import Constraint, SamplingParams, accept, argmax, candidate_gap, top_gap
from headstart.decode.textstream import TextStream
from headstart.engine.gate import SERVER_KEY, Decision, Gate, answers_key, session_key
from headstart.engine.loop import Cancelled, Job, Scheduler, default_step_tokens
from headstart.engine.output import Completion, Delta, Handle
from headstart.engine.writer import Writer, done
from headstart.errors import (
    BadRequest,
    ContextTooLong,
    EngineError,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
    check_context,
)
from headstart.idle import job as upkeep
from headstart.idle.job import IdleWork
from headstart.idle.prepos import PREDICTORS, PreposConfig
from headstart.kv.spill import Spill
from headstart.model.attention import KERNELS
from headstart.model.backend import Backend
from headstart.model.hf_runner import HFRunner
from headstart.model.llama import LINEARS
from headstart.model.runner import from_backend
from headstart.session.book import KVBook, Steps
from headstart.session.evict import Budget, default_budget
from headstart.session.prefix import PrefixCache
from headstart.session.registry import Limits, SessionRegistry
from headstart.session.session import ReadyPosition, Session
from headstart.session.store import TranscriptStore
from headstart.session.template import ChatTemplate, Message, common_prefix, encode_candidates
from headstart.session.tools import NO_TOOLS, HoldBack, ParsedAnswer, ToolChoiceError, ToolPlan, plan_tools
from headstart.stats import EngineStats, StreamStats

log = logging.getLogger("headstart.engine")

__all__ = [
    "BadRequest",
    "ContextTooLong",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Request",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "TooManySessions",
]

@dataclass
class Request:
    """One generation request as the engine sees it (door-independent)."""

    messages: list[Message]
    params: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None
    owner: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {"type": "function", ...}
    parallel_tool_calls: bool = True
    strict_tools: frozenset[str] = frozenset()  # functions declared strict: their calls follow their schema
    gate: bool | None = None
    gap_threshold: float | None = None
    fast_answer: list[str] | None = None
    ephemeral: bool = False
    create: bool = True
    # When the door received the request (time.perf_counter(), before it parsed anything):
    # every time the engine reports counts from here. None: now.
    arrival: float | None = None
    n: int = 1  # choices; more than one only for one-off requests (they share one prefill)
    prompt_ids: list[int] | None = None  # a raw prompt (text completions): no template, no transcript
    # The client reads the answer as it is made. Only then may the gate answer: a client
    # that waits for the whole answer gains nothing from an early first token, and its
    # answer is always the exact one.
    stream: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Server-wide behaviour."""

    pre_position: bool = True
    gate: bool = True
    # The gate fires where the lower confidence bound of its precision reaches gate_target
    # (calibrated online per key, over the last gate_window verified answers), unless a
    # fixed logit-gap threshold is set: that one carries no guarantee.
    gap_threshold: float | None = None
    gate_target: float = GATE_TARGET
    gate_confidence: float = GATE_CONFIDENCE
    gate_window: int = GATE_WINDOW
    sure_gap: float = SURE_GAP  # pre-positioning decodes past the exit while the gap is at least this
    predictor: str = PREDICTOR
    background_chunk: int = BACKGROUND_CHUNK
    continuation_cap: int = CONTINUATION_CAP
    forced_cap: int = FORCED_CAP
    kv_budget: int | None = None  # bytes; None: a share of the machine's memory
    max_sessions: int = MAX_SESSIONS
    idle_expiry_s: float = IDLE_EXPIRY_S
    max_context: int | None = None  # tokens; None: the model's context
    spill: bool | None = None  # None: on where reloading beats recomputing (the CPU)
    # Sessions API: waiting data entries per session (the oldest are dropped past it),
    # registered questions per session, and tokens of context kept free for questions.
    max_pending: int = MAX_PENDING
    max_queries: int = MAX_QUERIES
    context_reserve: int = CONTEXT_RESERVE
    # A block-granular prefix cache shared by one-off requests (the vLLM-style baseline the
    # benchmark compares with): capacity in pool blocks, 0 for none.
    prefix_cache_blocks: int = 0
    kv_block: int = KV_BLOCK
    # Tokens one step's forward may hold (decodes, prefill chunks, idle work); None: by device.
    step_tokens: int | None = None
    # The own runner's kernels (headstart/model/runner.py): the defaults are batch invariant;
    # attention "tiled" also gives a prompt prefilled in chunks the bits it gets at once.
    attention: str = ATTENTION
    linear: str = LINEAR

    def __post_init__(self) -> None:
        if self.attention not in KERNELS:
            raise ValueError(f"attention must be one of {', '.join(KERNELS)}, not {self.attention!r}")
        if self.linear not in LINEARS:
            raise ValueError(f"linear must be one of {', '.join(LINEARS)}, not {self.linear!r}")

    def prepos(self) -> PreposConfig:
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}")
        return PreposConfig(
            predictor=self.predictor,
            chunk=self.background_chunk,
            continuation_cap=self.continuation_cap,
            forced_cap=self.forced_cap,
            threshold=self.sure_gap,
        )


class _Emitter:
    """Turns chosen tokens into deltas on a handle and decides when to stop."""

    def __init__(
        self, engine: Engine, handle: Handle, job: Job, params: SamplingParams, chooser: Chooser,
        tools: ToolPlan = NO_TOOLS,
    ) -> None:
        self.handle = handle
        self.params = params
        self.chooser = chooser
        self.tools = tools
        self.hold = HoldBack(tools.parse)
        self.stream = TextStream(engine.template.tokenizer, params.stop)
        self.stop_ids = engine.stop_ids
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # of the chosen tokens, when asked for
        self._unsent: list[TokenLogprob] = []  # not yet on a delta
        self.first_at: float | None = None
        self.decided_at: float | None = None
        self.finish_reason: str | None = None
        self.job = job  # its forwards are the request's own, in steps shared with others
        self.forwards_before_first: int | None = None

    def _first(self) -> None:
        """Note the first token's moment and how many of this request's forwards preceded it."""
        self.first_at = time.perf_counter()
        self.forwards_before_first = self.job.forwards

    def emit(self, token: int, *, forced: bool = False) -> bool:
        """Send ``token``; True when the answer is finished."""
        if self.first_at is None:
            self._first()
        if self.decided_at is None and not forced:
            self.decided_at = time.perf_counter()
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return True
        chosen = self.chooser.last
        if chosen is not None and chosen.token == token:
            self.logprobs.append(chosen)
            self._unsent.append(chosen)
        self._push(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def _push(self, token: int) -> None:
        self.tokens.append(token)
        self._send(self.stream.push(token), [token])

    def _send(self, text: str, token_ids: list[int]) -> None:
        """Send text to the handle, unless it may be a tool call still being written."""
        text = self.hold.push(text)
        if text:
            self.handle.put(Delta(text, token_ids, self._take_unsent()))

    def _take_unsent(self) -> list[TokenLogprob] | None:
        out, self._unsent = self._unsent, []
        return out or None

    def emit_text(self, text: str, token_ids: list[int]) -> None:
        """A whole answer at once (a fast_answer candidate)."""
        self._first()
        self.decided_at = self.first_at
        self.tokens.extend(token_ids)
        self.stream.text = self.stream.sent = text
        self._send(text, list(token_ids))
        self.finish_reason = "stop"

    def close(self) -> ParsedAnswer:
        """Send what is left and read the answer for tool calls (a finished answer only:
        one cut by max_tokens or cancelled is returned as content)."""
        tail = self.hold.push(self.stream.finish())
        text = self.stream.text
        parsed = self.tools.read(text) if self.finish_reason == "stop" else ParsedAnswer(text, [])
        tail += self.hold.finish(bool(parsed.calls))
        if tail or self._unsent:
            self.handle.put(Delta(tail, [], self._take_unsent()))
        return parsed


@dataclass
class Turn:
    """One request on its way through the engine: its inputs and what happened to it."""

    req: Request
    params: SamplingParams
    prompt: list[int]
    candidates: tuple[list[list[int]], torch.Tensor] | None
    session: Session
    persistent: bool
    handle: Handle
    job: Job
    emitter: _Emitter
    generator: torch.Generator | None
    threshold: float | None  # the request's or session's own; None: the server's gate decides
    chooser: Chooser
    started: float = 0.0
    path: str = "cold"
    cached: int = 0
    gap: float | None = None
    speculative: bool = False
    verified: bool | None = None
    chosen: int | None = None
    verify: Callable[[], Generator[Any, Any, None]] | None = None
    reloaded: int = 0
    shadow: dict[str, Any] | None = None  # what the gate would have said on an exact path
    gate_keys: tuple[str, ...] = ()  # its calibration keys, most specific first


class Engine:
    """Sessions plus one model thread."""

    def __init__(
        self,
        backend: Backend,
        template: ChatTemplate | None = None,
        config: EngineConfig | None = None,
        *,
        store: TranscriptStore | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.backend = backend
        self.template = template or ChatTemplate(backend.tokenizer)  # type: ignore[attr-defined]
        self.config = config or EngineConfig()
        self.prepos_config = self.config.prepos()
        self.stats = EngineStats()
        self.gate = Gate(
            enabled=self.config.gate,
            threshold=self.config.gap_threshold,
            target=self.config.gate_target,
            confidence=self.config.gate_confidence,
            window=self.config.gate_window,
        )
        info = backend.info
        # Every stop of an answer: the template's end of message and the model's eos tokens.
        self.stop_ids = frozenset({*info.eos_token_ids, self.template.end_of_message})
        machine = default_budget(info.device)
        self.runner = from_backend(
            backend,  # type: ignore[arg-type]
            kv_budget=self.config.kv_budget or machine,
            block_size=self.config.kv_block,
            kernel=self.config.attention,
            linear=self.config.linear,
            physical_bytes=machine,
        )
        if isinstance(self.runner, HFRunner) and (self.config.attention, self.config.linear) != (ATTENTION, LINEAR):
            raise ValueError(f"attention={self.config.attention!r} and linear={self.config.linear!r} choose kernels "
                             f"of the own forward (llama, qwen2); {info.name} runs on transformers' instead")
        self.pool = self.runner.pool
        self.book = KVBook(backend, self.runner, self.stats)
        self.scheduler = Scheduler(self.book, self.stats, self.config.step_tokens or default_step_tokens(info.device))
        self.budget = Budget(self.pool, info.kv_bytes_per_token)
        spill_on = self.config.spill if self.config.spill is not None else info.device == "cpu"
        spill = Spill(spill_dir, self.pool, 4 * self.budget.limit) if spill_on and spill_dir else None
        limits = Limits(self.config.max_sessions, self.config.idle_expiry_s)
        self.sessions = SessionRegistry(self.pool, self.book, self.scheduler, self.budget, limits, store, spill)
        # Turns are committed off the model thread, in order (writer.py).
        self.writer = Writer() if store is not None else None
        self.book.make_room = self.sessions.make_room
        self.stream_stats = StreamStats()
        self.context_limit = min(info.context_length, self.config.max_context or info.context_length)
        self.idle = IdleWork(
            book=self.book, template=self.template, queue=self._queue_idle, queued=self.scheduler.has_background,
            stats=self.stats,
            stream_stats=self.stream_stats, persist=self.sessions.persist, prepos=self.prepos_config,
            stop=self.stop_ids, pre_position=self.config.pre_position, context_length=info.context_length,
            context_limit=self.context_limit, context_reserve=self.config.context_reserve,
        )
        self.prefix_cache = (
            PrefixCache(self.pool, self.config.prefix_cache_blocks) if self.config.prefix_cache_blocks else None
        )
        self.started = time.time()
        self._reaper_stop = threading.Event()
        self._grammars: Grammars | None = None  # built on the first constrained request
        # Called by the step's holder with every finished request, one at a time (metrics, benchmarks).
        self.observers: list[Callable[[Completion], None]] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Engine:
        self.scheduler.start()
        interval = min(60.0, max(0.5, self.config.idle_expiry_s / 4))
        threading.Thread(target=self._reap_loop, args=(interval,), name="headstart-reaper", daemon=True).start()
        for s in self.sessions.all():  # sessions restored from the store take up their idle-time work
            self.schedule_upkeep(s)
        return self

    def stop(self) -> None:
        self._reaper_stop.set()
        self.scheduler.stop()
        if self.sessions.store is not None:
            if self.writer is not None:
                self.writer.stop()  # what is queued is committed first
            self.sessions.store.close()  # and let the next server on it claim it

    def _queue_idle(self, key: str, steps: Steps, on_cancel: Callable[[], None],
                    on_error: Callable[[BaseException], None]) -> None:
        self.scheduler.submit_background(key, Job(steps, on_error=on_error, on_cancel=on_cancel))

    def _reap_loop(self, interval: float) -> None:
        while not self._reaper_stop.wait(interval):
            self.sessions.reap()

    def wait_idle(self, timeout: float = 120.0) -> bool:
        """Wait until no foreground or background work is left, and nothing waits to be committed."""
        deadline = time.monotonic() + timeout
        if not self.scheduler.wait_idle(timeout):
            return False
        writer = self.writer
        return writer is None or writer.drain(max(0.0, deadline - time.monotonic()))

    def report(self) -> dict[str, Any]:
        """Everything the engine counts, for the metrics door, the benchmark and the CLI."""
        counters = self.gate.counters
        evictions = self.sessions.evictions
        sessions = self.sessions.all()
        return {
            **self.stats.snapshot(),
            "gate": {
                **self.gate.describe(),
                "threshold": self.gate.threshold,
                "fires": counters.fires,
                "verified": counters.verified,
                "false_accepts": counters.false_accepts,
                "declined": counters.declined,
                "precision": counters.precision,
            },
            "sessions": len(sessions),
            "kv": {
                "resident_bytes": self.sessions.resident_bytes(),
                "budget_bytes": self.budget.limit,
                "peak_bytes": self.sessions.peak_resident,
                "resident_sessions": sum(1 for s in sessions if s.kv_ids),
                "evicted_ready": evictions.ready,
                "evicted_kv": evictions.kv,
                "spilled": evictions.spilled,
                "reloaded": evictions.reloaded,
                "expired": evictions.expired,
            },
            "background_chunks": self.scheduler.background_chunks,
            "step_tokens": self.scheduler.step_tokens,
        }

    # -- sessions --------------------------------------------------------------------

    def create_session(self, session_id: str | None = None, owner: str | None = None) -> Session:
        return self.sessions.create(session_id, owner)

    def get_session(self, session_id: str, owner: str | None = None) -> Session:
        return self.sessions.get(session_id, owner)

    def delete_session(self, session_id: str, owner: str | None = None) -> None:
        self.sessions.delete(session_id, owner)
        self.gate.forget(session_key(session_id))

    def list_sessions(self, owner: str | None = None) -> list[Session]:
        return self.sessions.visible(owner)

    def schedule_pre_position(self, s: Session) -> None:
        """Ask for a fresh move of ``s`` to its next decision point (after a turn, a new hint)."""
        if s.deleted:
            return
        s.prepos_epoch += 1
        self.schedule_upkeep(s)

    def schedule_upkeep(self, s: Session) -> None:
        """Make sure ``s``'s idle-time job is queued: data to ingest, registered questions,
        a warm, pre-positioning (idle/job.py decides what is left to do)."""
        upkeep.schedule(self.idle, s)

    # -- requests --------------------------------------------------------------------

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Validate ``req`` and queue it; the handle streams its output.

        Raises the engine's errors at once (bad input, unknown or busy session) so a door
        can answer them before any streaming starts. It renders and tokenises the whole
        conversation, so a door with an event loop calls it from a worker thread.
        """
        arrival = time.perf_counter() if req.arrival is None else req.arrival
        known = self.sessions.find(req.session_id) if req.session_id is not None else None
        if req.prompt_ids is not None:
            prompt = self._raw_prompt(req)
        elif not req.messages:
            raise BadRequest("messages must hold at least one message", param="messages")
        else:
            prompt = self.template.render(req.messages, tools=req.tools, cache=known.renders if known else None)
        try:
            tool_plan = plan_tools(self.template, req.tools, req.tool_choice, parallel=req.parallel_tool_calls,
                                   strict=req.strict_tools)
        except ToolChoiceError as exc:
            raise BadRequest(str(exc), param=exc.param) from exc
        limit = self.context_limit
        check_context(len(prompt), limit)
        params = req.params
        if tool_plan.constraint is not None:  # the calls' grammar, through the same machinery as a format
            if params.constraint is not None:
                raise BadRequest("response_format cannot be combined with strict tools or a tool_choice that "
                                 "forces a call", param="response_format")
            params = dataclasses.replace(params, constraint=tool_plan.constraint)
        if len(prompt) + params.max_tokens > limit:
            params = dataclasses.replace(params, max_tokens=limit - len(prompt))
        self._check_params(params, req)
        # The most KV this request can hold: its prompt, its answer, a ready position's sure tail.
        reserve_tokens = len(prompt) + params.max_tokens + self.config.forced_cap
        reserve = self.pool.blocks_for(reserve_tokens) * self.pool.block_bytes  # in whole blocks
        if reserve > self.budget.limit:
            raise BadRequest(
                f"this request may need {reserve} bytes of KV but the server's budget is {self.budget.limit}",
                param="max_tokens",
            )
        candidates = self._candidates(req.fast_answer)
        if req.n > 1 and (req.session_id is not None or req.fast_answer is not None):
            raise BadRequest("n > 1 is for one-off requests: a session holds one continuation, and a fast_answer "
                             "is one choice", param="n")
        handle = Handle(loop, arrival)
        if req.session_id is None:
            s = Session(f"oneoff-{uuid.uuid4().hex[:12]}", self.pool, req.owner)
            self.sessions.one_off(s)
            persistent = False
        else:
            s = self.sessions.acquire(req.session_id, req.owner, create=req.create)
            persistent = True
        threshold = next((x for x in (req.gap_threshold, s.settings.gap_threshold) if x is not None), None)
        job = Job(iter(()), admit=lambda: self.sessions.admit(s, reserve_tokens),
                  abandoned=lambda: handle.cancelled)
        generator = params.generator(self.backend.info.device)

        def turn(h: Handle) -> Turn:
            chooser = Chooser(params, prompt, self.backend.info.vocab_size, self.backend.info.device, generator,
                              matcher=self._matcher(params))
            return Turn(req, params, prompt, candidates, s, persistent, h, job,
                        _Emitter(self, h, job, params, chooser, tool_plan), generator, threshold, chooser)

        handle.choices = [handle, *(Handle(loop, arrival) for _ in range(req.n - 1))]
        turns = [turn(h) for h in handle.choices]
        for t in turns:
            t.gate_keys = (
                *([answers_key(req.fast_answer)] if req.fast_answer is not None else []),
                *([session_key(s.id)] if persistent else []),
                SERVER_KEY,
            )
        job.steps = self._serve(turns[0]) if req.n == 1 else self._serve_choices(turns)
        job.on_error = lambda exc: self._fail(s, handle, exc)
        self.scheduler.submit(job)
        return handle

    def generate(self, req: Request) -> Completion:
        """Submit and wait (for scripts and tests)."""
        return self.submit(req).result()

    def _raw_prompt(self, req: Request) -> list[int]:
        """A text completion's prompt, as given; it keeps its session's KV warm but leaves the
        chat transcript (and so pre-positioning) alone."""
        ids = list(req.prompt_ids or ())
        vocab = len(self.template.tokenizer)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise BadRequest(f"{bad} is not a token id of this model (0..{vocab - 1})", param="prompt")
        if req.tools or req.messages:
            raise BadRequest("a raw prompt takes neither messages nor tools", param="prompt")
        return ids

    def compile_constraint(self, constraint: Constraint) -> None:
        """Compile ``constraint`` ahead of its request (a door calls this off its event loop:
        a new schema takes seconds); the compiled grammar is kept for every later request."""
        if self._grammars is None:
            self._grammars = Grammars(self.template.tokenizer, self.backend.info.vocab_size, set(self.stop_ids))
        try:
            self._grammars.compile(constraint)
        except GrammarError as exc:
            raise BadRequest(str(exc), param=exc.param) from exc

    def _matcher(self, params: SamplingParams) -> GrammarMatcher | None:
        """A fresh position in the request's grammar."""
        if params.constraint is None:
            return None
        self.compile_constraint(params.constraint)
        assert self._grammars is not None
        return self._grammars.matcher(params.constraint)

    def _check_params(self, params: SamplingParams, req: Request) -> None:
        """What the logits rules need to be valid here (the door checked the ranges)."""
        vocab = len(self.template.tokenizer) if params.logit_bias else 0  # a call into the tokenizer
        for token, _ in params.logit_bias:
            if not 0 <= token < vocab:
                raise BadRequest(f"logit_bias: {token} is not a token id of this model (0..{vocab - 1})",
                                 param="logit_bias")
        if req.fast_answer is not None and (params.reshapes or params.logprobs):
            raise BadRequest("fast_answer picks a whole candidate by its first token's logit; it cannot be combined "
                             "with penalties, logit_bias, a response_format, a tool grammar or logprobs", "fast_answer")

    def _candidates(self, fast_answer: list[str] | None) -> tuple[list[list[int]], torch.Tensor] | None:
        if fast_answer is None:
            return None
        encoded = encode_candidates(self.template, fast_answer)
        first = torch.tensor([ids[0] for ids in encoded], device=self.backend.info.device)
        return encoded, first

    def _fail(self, s: Session, handle: Handle, exc: BaseException) -> None:
        log.exception("request failed", exc_info=exc)
        with self.stats.lock:
            self.stats.errors += 1
        # The KV may be half-updated: start this session's cache over (its transcript stays).
        self.book.reset(s)
        self.sessions.release(s)
        for h in handle.choices:
            h.put(exc)

    def _gate_on(self, t: Turn) -> bool:
        """Off on the server is off everywhere, and for a client that does not stream; else
        the request, then the session, decide."""
        if not self.gate.enabled or not t.req.stream:
            return False
        for choice in (t.req.gate, t.session.settings.gate):
            if choice is not None:
                return choice
        return True

    def gate_decision(self, s: Session) -> Decision:
        """Where the gate stands for a plain request on ``s`` (the session object shows it)."""
        return self.gate.decide((session_key(s.id), SERVER_KEY), s.settings.gap_threshold)

    def _serve(self, t: Turn) -> Generator[None, None, None]:
        """The foreground job of one request: pick its path, answer, tidy up."""
        t.started = time.perf_counter()
        s, prompt = t.session, t.prompt
        if t.persistent:
            t.reloaded = self.sessions.reload(s)
        if self.prefix_cache is not None and not t.persistent:
            self.prefix_cache.attach(s, prompt)
        exact = next((rp for rp in s.ready.values() if rp.ids == prompt and self.book.valid(s, rp)), None)
        nxt = s.ready.get("next")
        if nxt is not None and (
            nxt is exact or not self.book.valid(s, nxt) or prompt[: nxt.base] != nxt.ids[: nxt.base]
        ):
            nxt = None
        try:
            if exact is not None:
                yield from self._serve_ready(t, exact)
            elif (
                nxt is not None
                and self._gate_on(t)
                and self.gate.decide(t.gate_keys, t.threshold).fires(self._signal(nxt, t.candidates, t.chooser)[1])
            ):
                yield from self._serve_gate(t, nxt)
            else:
                yield from self._serve_exact(t, nxt)
            if t.verify is not None:
                yield from t.verify()  # the answer is out: verify it before the final chunk says so
        except Cancelled:
            self._cancelled(t)
        completion, committed = self._finish(t)
        self._after(t)
        # Delivered once the session is free, so a client's next request never finds it busy.
        self._deliver(t.handle, completion, committed)

    def _commit(self, s: Session, before: tuple[Any, ...]) -> Future[None]:
        """Commit the session's new turn on the writer thread, so the model thread goes on at
        once; a store that cannot commit undoes the turn, and the request fails with its error."""
        if self.writer is None:
            return done()

        def write() -> None:
            try:
                self.sessions.persist(s)
            except StoreUnavailable:
                s.messages, s.tools, s.turns, s.last_delta = before  # not durable: no turn, and a 503
                raise

        return self.writer.submit(write)

    @staticmethod
    def _deliver(handle: Handle, completion: Completion, committed: Future[None]) -> None:
        """Send the completion once its turn is committed (by the writer thread, so the
        model thread goes on at once); a failed commit fails the request instead."""

        def send(f: Future[None]) -> None:
            exc = f.exception()
            handle.put(completion if exc is None else exc)

        committed.add_done_callback(send)

    def _serve_choices(self, turns: list[Turn]) -> Generator[None, None, None]:
        """``n`` choices of a one-off request: one prefill, then each choice decoded in turn
        from the prompt's logits, the KV cut back to the prompt between them."""
        first = turns[0]
        s, prompt = first.session, first.prompt
        for t in turns:
            t.started = time.perf_counter()
        try:
            logits = yield from self.book.advance(s, prompt, background=False, chunk=len(prompt))
        except Cancelled:
            logits = None
        for t in turns:
            if logits is None:
                t.emitter.finish_reason = "cancelled"
            else:
                t.gap = top_gap(logits)[1]
                self.book.crop(s, len(prompt), wasted=False)
                try:
                    yield from self._decode(t, logits, [], [])
                except Cancelled:  # the client left: the choices after this one are not computed
                    t.emitter.finish_reason = "cancelled"
                    logits = None
            self._deliver(t.handle, *self._finish(t))
        self._after(first)

    def _cancelled(self, t: Turn) -> None:
        """End a turn whose client left (the loop threw Cancelled at a step boundary). Nothing
        is committed, so the transcript is unchanged; the KV keeps the prompt when it is all
        in (exact rows a retry reuses) and otherwise goes back to what the turn found, and the
        rows of an answer nobody received go."""
        s, prompt = t.session, t.prompt
        t.emitter.finish_reason = "cancelled"
        self.book.crop(s, len(prompt) if s.kv_ids[: len(prompt)] == prompt else t.cached)

    def _serve_ready(self, t: Turn, rp: ReadyPosition) -> Generator[None, None, None]:
        """``ready_exact``: the prompt is the ready position's; its KV and logits are the real ones."""
        t.path, t.cached, t.gap = "ready_exact", len(t.prompt), rp.gap
        self.book.restore(t.session, rp, keep=t.req.ephemeral)
        if not t.req.ephemeral:
            t.session.ready.pop(rp.key, None)
        if t.candidates is not None:
            self._answer_candidate(t, rp.logits[0])
        else:
            yield from self._decode(t, rp.logits[0], rp.forced, rp.logits[1:], known_argmax=rp.token)

    def _serve_gate(self, t: Turn, rp: ReadyPosition) -> Generator[None, None, None]:
        """``gate``: the first token comes from the cached distribution at once; the real delta is
        then prefilled with the ready position's sure tail as drafts, and the first token checked."""
        s, prompt = t.session, t.prompt
        t.path, t.speculative = "gate", True
        t.chosen, t.gap = self._signal(rp, t.candidates, t.chooser)
        s.ready.pop("next", None)
        self.book.discard(rp)
        lcp = min(common_prefix(prompt, s.kv_ids), len(prompt) - 1)
        t.cached = lcp
        self.book.crop(s, lcp)
        self.book.take(s, lcp)
        if t.candidates is not None:
            first_ids = t.candidates[1]
            t.emitter.emit_text(t.req.fast_answer[t.chosen], t.candidates[0][t.chosen])  # type: ignore[index]

            def verify() -> Generator[Any, Any, None]:
                real = (yield from self.book.feed(s, prompt[lcp:], background=False))[-1]
                t.verified = candidate_gap(real, first_ids)[0] == t.chosen
                self.gate.record(t.gate_keys, t.gap, t.verified, fired=True)

            t.verify = verify
            return
        first = t.chooser.choose(rp.logits[0], cached=True, argmax=rp.token)
        rules = t.chooser.last_step
        assert rules is not None
        sure = bool(rp.forced) and first == rp.forced[0]
        done = t.emitter.emit(first, forced=sure)
        drafts = rp.forced[1:] if sure and not done else []
        tail = [] if done else [first, *drafts]
        out = yield from self.book.feed(s, prompt[lcp:] + tail, background=False, keep=len(tail) + 1)
        t.verified = accept(rules.apply(out[0]), rules.apply(rp.logits[0]), first, t.params, t.generator)
        self.gate.record(t.gate_keys, t.gap, t.verified, fired=True)
        if not done:
            yield from self._decode(t, out[1], drafts, list(out[2:]))

    def _serve_exact(self, t: Turn, rp: ReadyPosition | None) -> Generator[None, None, None]:
        """``entry``, ``session`` or ``cold``: compute what the session does not hold, then decode."""
        s, prompt = t.session, t.prompt
        lcp = min(common_prefix(prompt, s.kv_ids), len(prompt) - 1)
        t.cached = lcp
        if lcp == 0:
            t.path = "cold"
        elif s.entry_len is not None and lcp >= s.entry_len:
            t.path = "entry"
        elif not t.persistent:
            t.path = "prefix"  # a one-off request that found blocks in the shared prefix cache
        else:
            t.path = "session"
        logits = yield from self.book.advance(s, prompt, background=False, chunk=len(prompt))
        if rp is not None:
            # Shadow check: what the gate would have said here, recorded for calibration.
            choice, gap = self._signal(rp, t.candidates)
            real = candidate_gap(logits, t.candidates[1])[0] if t.candidates is not None else argmax(logits)
            self.gate.record(t.gate_keys, gap, choice == real, fired=False)
            t.shadow = {"gap": gap, "agree": choice == real, "choice": choice}
            if self._gate_on(t):
                self.gate.decline()
        if t.candidates is not None:
            self._answer_candidate(t, logits)
        else:
            t.gap = top_gap(logits)[1]
            yield from self._decode(t, logits, [], [])

    def _answer_candidate(self, t: Turn, logits: torch.Tensor) -> None:
        """A fast_answer request: the whole best candidate, with no decode step."""
        assert t.candidates is not None and t.req.fast_answer is not None
        t.chosen, t.gap = candidate_gap(logits, t.candidates[1])
        t.emitter.emit_text(t.req.fast_answer[t.chosen], t.candidates[0][t.chosen])

    def _signal(
        self, rp: ReadyPosition, candidates: tuple[list[list[int]], torch.Tensor] | None,
        chooser: Chooser | None = None,
    ) -> tuple[int, float]:
        """The gate's signal at ``rp``: (choice, gap) over the vocabulary or the candidates;
        under the request's logits rules when it has any (a masked distribution is scanned)."""
        if candidates is not None:
            return candidate_gap(rp.logits[0], candidates[1])
        if chooser is not None and chooser.active:
            return top_gap(chooser.step().apply(rp.logits[0]))
        return rp.token, rp.gap

    def _decode(
        self, t: Turn, logits: torch.Tensor, drafts: list[int], draft_logits: list[torch.Tensor],
        known_argmax: int | None = None,
    ) -> Generator[None, None, None]:
        """Generate until a stop. ``drafts`` are tokens already in the KV after the current
        position (a ready position's sure tail, or a gate's draft) with the logits after
        each; a draft is kept only while the chosen token equals it, which makes them
        exact: the verification step of speculative decoding. ``known_argmax``: that of
        ``logits``, when a ready position found it in idle time."""
        s, em = t.session, t.emitter
        drafts, draft_logits = list(drafts), list(draft_logits)
        while True:
            token = t.chooser.choose(logits, argmax=known_argmax)
            known_argmax = None
            is_draft = bool(drafts) and token == drafts[0]
            if em.emit(token, forced=is_draft):
                break
            if is_draft:
                drafts.pop(0)
                logits = draft_logits.pop(0)
                continue
            if drafts:
                self.book.crop(s, len(s.kv_ids) - len(drafts))
                drafts, draft_logits = [], []
            # The loop sends the logits right after the forward that made them, so the pick
            # (and an answer's end) goes out with that forward, not a step later.
            logits = (yield from self.book.feed(s, [token], background=False))[-1]
        if drafts:
            self.book.crop(s, len(s.kv_ids) - len(drafts))
        self.book.take(s, len(s.kv_ids))

    def _finish(self, t: Turn) -> tuple[Completion, Future[None]]:
        """Record the request and queue the session's new transcript; the completion to send
        and the commit it must wait for."""
        em, s, handle = t.emitter, t.session, t.handle
        answer = em.close()
        text = answer.content or ""
        now = time.perf_counter()
        first = em.first_at or now
        completion = Completion(
            text=text,
            token_ids=list(em.tokens),
            finish_reason="tool_calls" if answer.calls else em.finish_reason or "stop",
            path=t.path,
            session_id=s.id if t.persistent else None,
            prompt_tokens=len(t.prompt),
            cached_tokens=min(t.cached, len(t.prompt)),
            ttft_ms=(first - handle.arrival) * 1000,
            decided_ms=((em.decided_at or first) - handle.arrival) * 1000,
            e2e_ms=(now - handle.arrival) * 1000,
            foreground_wait_ms=(t.started - handle.arrival) * 1000,
            door_ms=(t.job.submitted - handle.arrival) * 1000,
            queue_ms=(t.started - t.job.submitted) * 1000,
            background_wait_ms=t.job.background_wait * 1000,
            logit_gap=t.gap,
            speculative=t.speculative,
            verified=t.verified,
            candidate=t.chosen,
            extra={
                "forwards_before_first_token": em.forwards_before_first,
                "forwards": t.job.forwards,  # this request's forwards in all
                "reloaded_tokens": t.reloaded,
                **({"shadow": t.shadow} if t.shadow else {}),
            },
            tool_calls=answer.calls or None,
            logprobs=list(em.logprobs) if t.params.logprobs else None,
        )
        self.stats.record_request(
            t.path,
            completion.ttft_ms,
            completion.e2e_ms,
            completion.background_wait_ms,
            completion.prompt_tokens,
            t.cached,
            completion.completion_tokens,
        )
        s.paths[t.path] += 1
        for observe in self.observers:
            try:
                observe(completion)
            except Exception:  # an observer must never fail a request
                log.exception("completion observer failed")
        req = t.req
        committed = done()
        if t.persistent and not req.ephemeral and req.prompt_ids is None and completion.finish_reason != "cancelled":
            reply: Message = {"role": "assistant", "content": text}
            if answer.calls:  # as the template renders a call, so the next turn's prefix matches
                reply["tool_calls"] = [c.message() for c in answer.calls]
            before = s.messages, s.tools, s.turns, s.last_delta
            s.messages = [*req.messages, reply]
            s.tools = req.tools
            s.turns += 1
            last = req.messages[-1]
            s.last_delta = last.get("content") if isinstance(last.get("content"), str) else None
            committed = self._commit(s, before)  # committed before the client hears of the turn
        return completion, committed

    def _after(self, t: Turn) -> None:
        """Tidy the session once its request is answered, and queue its idle-time work."""
        s = t.session
        if not t.persistent:
            if self.prefix_cache is not None:
                self.prefix_cache.store(s)
            s.kv.release()  # a one-off request's KV goes with it
        if t.req.ephemeral and t.persistent:
            # Leave only the session's own context: the question was a one-off.
            own = self.template.entry(s.messages, "user", tools=s.tools, cache=s.renders) if s.messages else []
            self.book.crop(s, common_prefix(s.kv_ids, own))
        self.book.drop_invalid(s)
        self.sessions.release(s)
        if t.req.prompt_ids is not None:
            return  # a raw prompt says nothing about the next chat turn
        if t.persistent and not t.req.ephemeral:
            self.schedule_pre_position(s)
        elif t.persistent:
            self.schedule_upkeep(s)  # take up work the request interrupted
