"""The engine: sessions, the choice of path for each request, and generation.

Every request is rendered in full and compared token by token with what its session
holds; the path it takes is decided from that comparison and the session's ready
positions (see DESIGN.md for the five paths). All model work runs as jobs on the
scheduler's single thread; this module never blocks a door on the model.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from headstart.gate import Gate
from headstart.handle import Completion, Delta, Handle
from headstart.kvbook import KVBook
from headstart.model.backend import Backend
from headstart.prefixcache import PrefixCache
from headstart.prepos import PREDICTORS, PreposConfig, pre_position
from headstart.sampling import SamplingParams, accept, candidate_gap, pick, top_gap
from headstart.scheduler import Job, Scheduler
from headstart.session import ReadyPosition, Session
from headstart.stats import EngineStats
from headstart.template import ChatTemplate, Message, common_prefix
from headstart.textstream import TextStream

log = logging.getLogger("headstart.engine")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class EngineError(Exception):
    """A request the engine refuses; doors map each kind to a status code."""


class BadRequest(EngineError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SessionNotFound(EngineError):
    pass


class SessionBusy(EngineError):
    pass


class SessionExists(EngineError):
    pass


class ContextTooLong(BadRequest):
    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens but the model's context holds {limit}",
            param="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


@dataclass
class Request:
    """One generation request as the engine sees it (door-independent)."""

    messages: list[Message]
    params: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None
    owner: str | None = None
    tools: list[dict[str, Any]] | None = None
    gate: bool | None = None
    gap_threshold: float | None = None
    fast_answer: list[str] | None = None
    ephemeral: bool = False
    create: bool = True


@dataclass(frozen=True)
class EngineConfig:
    """Server-wide behaviour."""

    pre_position: bool = True
    gate: bool = True
    gap_threshold: float = 2.0
    predictor: str = "continuation"
    background_chunk: int = 16
    continuation_cap: int = 32
    forced_cap: int = 16
    # A block-granular prefix cache shared by one-off requests (the vLLM-style baseline the
    # benchmark compares with): capacity in blocks, 0 for none.
    prefix_cache_blocks: int = 0
    prefix_block: int = 16

    def prepos(self) -> PreposConfig:
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}")
        return PreposConfig(
            predictor=self.predictor,
            chunk=self.background_chunk,
            continuation_cap=self.continuation_cap,
            forced_cap=self.forced_cap,
            threshold=self.gap_threshold,
        )


class _Emitter:
    """Turns chosen tokens into deltas on a handle and decides when to stop."""

    def __init__(self, engine: Engine, handle: Handle, params: SamplingParams) -> None:
        self.handle = handle
        self.params = params
        self.stream = TextStream(engine.template.tokenizer, params.stop)
        self.stop_ids = {*engine.backend.info.eos_token_ids, engine.template.end_of_message}
        self.tokens: list[int] = []
        self.first_at: float | None = None
        self.decided_at: float | None = None
        self.finish_reason: str | None = None
        self._stats = engine.stats
        self._forwards_at_start = engine.stats.forward_calls
        self.forwards_before_first: int | None = None

    def _first(self) -> None:
        """Note the first token's moment and how many forward passes preceded it."""
        self.first_at = time.perf_counter()
        self.forwards_before_first = self._stats.forward_calls - self._forwards_at_start

    def emit(self, token: int, *, forced: bool = False) -> bool:
        """Send ``token``; True when the answer is finished."""
        if self.first_at is None:
            self._first()
        if self.decided_at is None and not forced:
            self.decided_at = time.perf_counter()
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return True
        self.tokens.append(token)
        text = self.stream.push(token)
        if text:
            self.handle.put(Delta(text, [token]))
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def emit_text(self, text: str, token_ids: list[int]) -> None:
        """A whole answer at once (a fast_answer candidate)."""
        self._first()
        self.decided_at = self.first_at
        self.tokens.extend(token_ids)
        self.stream.text = self.stream.sent = text
        self.handle.put(Delta(text, list(token_ids)))
        self.finish_reason = "stop"

    def close(self) -> str:
        tail = self.stream.finish()
        if tail:
            self.handle.put(Delta(tail, []))
        return self.stream.text


class Engine:
    """Sessions plus one model thread."""

    def __init__(self, backend: Backend, template: ChatTemplate | None = None, config: EngineConfig | None = None):
        self.backend = backend
        self.template = template or ChatTemplate(backend.tokenizer)  # type: ignore[attr-defined]
        self.config = config or EngineConfig()
        self.prepos_config = self.config.prepos()
        self.stats = EngineStats()
        self.gate = Gate(threshold=self.config.gap_threshold, enabled=self.config.gate)
        self.book = KVBook(backend, self.stats)
        self.scheduler = Scheduler()
        self.sessions: dict[str, Session] = {}
        self.prefix_cache = (
            PrefixCache(backend, self.config.prefix_block, self.config.prefix_cache_blocks)
            if self.config.prefix_cache_blocks
            else None
        )
        self._lock = threading.Lock()
        self.started = time.time()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Engine:
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()

    def wait_idle(self, timeout: float = 120.0) -> bool:
        """Wait until no foreground or background work is left."""
        return self.scheduler.wait_idle(timeout)

    # -- sessions --------------------------------------------------------------------

    def create_session(self, session_id: str | None = None, owner: str | None = None) -> Session:
        session_id = session_id or uuid.uuid4().hex
        if not SESSION_ID.match(session_id):
            raise BadRequest("a session id is 1-128 characters of A-Z a-z 0-9 _ -", param="id")
        with self._lock:
            if session_id in self.sessions:
                raise SessionExists(f"session {session_id!r} already exists")
            s = Session(session_id, self.backend, owner)
            self.sessions[session_id] = s
        return s

    def get_session(self, session_id: str, owner: str | None = None) -> Session:
        with self._lock:
            s = self.sessions.get(session_id)
        if s is None or (s.owner is not None and s.owner != owner):
            raise SessionNotFound(f"no session {session_id!r}")
        return s

    def delete_session(self, session_id: str, owner: str | None = None) -> None:
        s = self.get_session(session_id, owner)
        with self._lock:
            if s.busy:
                raise SessionBusy(f"session {session_id!r} has a request in flight")
            self.sessions.pop(session_id, None)
        self.scheduler.cancel_background(session_id)
        for rp in s.ready.values():
            self.book.discard(rp)
        s.ready.clear()

    def list_sessions(self, owner: str | None = None) -> list[Session]:
        with self._lock:
            return [s for s in self.sessions.values() if s.owner is None or s.owner == owner]

    def schedule_pre_position(self, s: Session) -> None:
        """Queue the idle-time job that moves ``s`` to its next decision point."""
        if not (self.config.pre_position and s.settings.pre_position and s.messages):
            return
        job = Job(pre_position(self.book, self.template, s, self.prepos_config))
        self.scheduler.submit_background(s.id, job)

    # -- requests --------------------------------------------------------------------

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Validate ``req`` and queue it; the handle streams its output.

        Raises the engine's errors at once (bad input, unknown or busy session) so a door
        can answer them before any streaming starts.
        """
        if not req.messages:
            raise BadRequest("messages must hold at least one message", param="messages")
        prompt = self.template.render(req.messages, tools=req.tools)
        limit = self.backend.info.context_length
        if len(prompt) >= limit:
            raise ContextTooLong(len(prompt), limit)
        params = req.params
        if len(prompt) + params.max_tokens > limit:
            params = SamplingParams(
                max_tokens=limit - len(prompt),
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=params.stop,
            )
        candidates = self._candidates(req.fast_answer)
        handle = Handle(loop)
        with self._lock:
            if req.session_id is None:
                s = Session(f"oneoff-{uuid.uuid4().hex[:12]}", self.backend, req.owner)
                persistent = False
            else:
                s = self.sessions.get(req.session_id)
                if s is not None and s.owner is not None and s.owner != req.owner:
                    raise SessionNotFound(f"no session {req.session_id!r}")
                if s is None:
                    if not req.create:
                        raise SessionNotFound(f"no session {req.session_id!r}")
                    if not SESSION_ID.match(req.session_id):
                        raise BadRequest(
                            "a session id is 1-128 characters of A-Z a-z 0-9 _ -", param="x-session-id"
                        )
                    s = Session(req.session_id, self.backend, req.owner)
                    self.sessions[s.id] = s
                persistent = True
            if s.busy:
                raise SessionBusy(f"session {s.id!r} has a request in flight")
            s.busy = True
            s.last_used = time.time()
        if persistent:
            self.scheduler.cancel_background(s.id)
        steps = self._serve(req, params, prompt, candidates, s, persistent, handle)
        job = Job(steps, submitted=handle.arrival)
        handle.job = job
        job.on_error = lambda exc: self._fail(s, handle, exc)
        self.scheduler.submit(job)
        return handle

    def generate(self, req: Request) -> Completion:
        """Submit and wait (for scripts and tests)."""
        return self.submit(req).result()

    def _candidates(self, fast_answer: list[str] | None) -> tuple[list[list[int]], torch.Tensor] | None:
        if fast_answer is None:
            return None
        if not fast_answer or any(not isinstance(c, str) or not c for c in fast_answer):
            raise BadRequest("fast_answer must be a non-empty list of non-empty strings", param="fast_answer")
        encoded = [self.template.encode(c) for c in fast_answer]
        first = torch.tensor([ids[0] for ids in encoded], device=self.backend.info.device)
        return encoded, first

    def _fail(self, s: Session, handle: Handle, exc: BaseException) -> None:
        log.exception("request failed", exc_info=exc)
        with self.stats.lock:
            self.stats.errors += 1
        # The KV may be half-updated: start this session's cache over (its transcript stays).
        self.backend.crop(s.kv, 0)
        s.kv_ids.clear()
        s.kv_background.clear()
        s.entry_len = None
        s.ready.clear()
        s.busy = False
        handle.put(exc)

    def _gate_on(self, req: Request, s: Session) -> bool:
        """Off on the server is off everywhere; else the request, then the session, decide."""
        if not self.gate.enabled:
            return False
        for choice in (req.gate, s.settings.gate):
            if choice is not None:
                return choice
        return True

    def _serve(
        self,
        req: Request,
        params: SamplingParams,
        prompt: list[int],
        candidates: tuple[list[list[int]], torch.Tensor] | None,
        s: Session,
        persistent: bool,
        handle: Handle,
    ) -> Generator[None, None, None]:
        """The foreground job of one request."""
        started = time.perf_counter()
        em = _Emitter(self, handle, params)
        generator = params.generator(self.backend.info.device)
        threshold = req.gap_threshold if req.gap_threshold is not None else s.settings.gap_threshold
        if threshold is None:
            threshold = self.gate.threshold
        gap: float | None = None
        speculative = False
        verified: bool | None = None
        chosen: int | None = None
        shadow: dict[str, Any] | None = None
        if self.prefix_cache is not None and not persistent:
            self.prefix_cache.attach(s, prompt)

        exact = next((rp for rp in s.ready.values() if rp.ids == prompt and self.book.valid(s, rp)), None)
        nxt = s.ready.get("next")
        if nxt is not None and (
            nxt is exact or not self.book.valid(s, nxt) or prompt[: nxt.base] != nxt.ids[: nxt.base]
        ):
            nxt = None

        if exact is not None:
            path = "ready_exact"
            cached = len(prompt)
            gap = exact.gap
            self.book.restore(s, exact)
            if not req.ephemeral:
                s.ready.pop(exact.key, None)
            if candidates is not None:
                chosen, gap = candidate_gap(exact.logits[0], candidates[1])
                em.emit_text(req.fast_answer[chosen], candidates[0][chosen])
            else:
                yield from self._decode(s, exact.logits[0], em, generator, exact.forced, exact.logits[1:])
        elif nxt is not None and self._gate_on(req, s) and self.gate.fires(self._signal(nxt, candidates)[1], threshold):
            path = "gate"
            speculative = True
            chosen, gap = self._signal(nxt, candidates)
            s.ready.pop("next", None)
            self.book.discard(nxt)
            lcp = min(common_prefix(prompt, s.kv_ids), len(prompt) - 1)
            cached = lcp
            self.book.crop(s, lcp)
            self.book.take(s, lcp)
            if candidates is not None:
                em.emit_text(req.fast_answer[chosen], candidates[0][chosen])
                self._finish(req, s, persistent, handle, em, path, prompt, cached, started, gap, speculative, chosen)
                yield  # the answer is out; verify off the critical path
                real = self.book.feed(s, prompt[lcp:], background=False)[-1]
                verified = candidate_gap(real, candidates[1])[0] == chosen
                self.gate.record(gap, verified, fired=True)
                handle.completion.verified = verified  # type: ignore[union-attr]
                self._after(req, s, persistent, prompt)
                return
            first = pick(nxt.logits[0], params, generator)
            done = em.emit(first, forced=bool(nxt.forced) and first == nxt.forced[0])
            yield
            drafts = nxt.forced[1:] if nxt.forced and first == nxt.forced[0] and not done else []
            tail = [] if done else [first, *drafts]
            out = self.book.feed(s, prompt[lcp:] + tail, background=False, keep=len(tail) + 1)
            verified = accept(out[0], nxt.logits[0], first, params, generator)
            self.gate.record(gap, verified, fired=True)
            if not done:
                yield from self._decode(s, out[1], em, generator, drafts, list(out[2:]))
        else:
            lcp = min(common_prefix(prompt, s.kv_ids), len(prompt) - 1)
            cached = lcp
            if lcp == 0:
                path = "cold"
            elif s.entry_len is not None and lcp >= s.entry_len:
                path = "entry"
            elif not persistent:
                path = "prefix"
            else:
                path = "session"
            logits = yield from self.book.advance(s, prompt, background=False, chunk=len(prompt))
            if nxt is not None and prompt != nxt.ids:
                # Shadow check: what the gate would have said, for calibration.
                sig_choice, sig_gap = self._signal(nxt, candidates)
                real_choice = (
                    candidate_gap(logits, candidates[1])[0] if candidates is not None else int(logits.argmax())
                )
                self.gate.record(sig_gap, sig_choice == real_choice, fired=False)
                shadow = {"gap": sig_gap, "agree": sig_choice == real_choice, "choice": sig_choice}
                if self._gate_on(req, s):
                    self.gate.decline()
            if candidates is not None:
                chosen, gap = candidate_gap(logits, candidates[1])
                em.emit_text(req.fast_answer[chosen], candidates[0][chosen])
            else:
                gap = top_gap(logits)[1]
                yield from self._decode(s, logits, em, generator, [], [])
        self._finish(
            req, s, persistent, handle, em, path, prompt, cached, started, gap, speculative, chosen, verified, shadow
        )
        self._after(req, s, persistent, prompt)

    def _signal(
        self, rp: ReadyPosition, candidates: tuple[list[list[int]], torch.Tensor] | None
    ) -> tuple[int, float]:
        """The gate's signal at ``rp``: (choice, gap) over the vocabulary or the candidates."""
        if candidates is not None:
            return candidate_gap(rp.logits[0], candidates[1])
        return rp.token, rp.gap

    def _decode(
        self,
        s: Session,
        logits: torch.Tensor,
        em: _Emitter,
        generator: torch.Generator | None,
        drafts: list[int],
        draft_logits: list[torch.Tensor],
    ) -> Generator[None, None, None]:
        """Generate until a stop. ``drafts`` are tokens already in the KV after the current
        position (a ready position's sure tail, or a gate's draft) with the logits after
        each; a draft is kept only while the chosen token equals it, which makes them
        exact: the verification step of speculative decoding."""
        drafts, draft_logits = list(drafts), list(draft_logits)
        while True:
            token = pick(logits, em.params, generator)
            is_draft = bool(drafts) and token == drafts[0]
            if em.emit(token, forced=is_draft):
                break
            if is_draft:
                drafts.pop(0)
                logits = draft_logits.pop(0)
            else:
                if drafts:
                    self.book.crop(s, len(s.kv_ids) - len(drafts))
                    drafts, draft_logits = [], []
                logits = self.book.feed(s, [token], background=False)[-1]
            if em.handle.cancelled:
                em.finish_reason = "cancelled"
                break
            yield
        if drafts:
            self.book.crop(s, len(s.kv_ids) - len(drafts))
        self.book.take(s, len(s.kv_ids))

    def _finish(
        self,
        req: Request,
        s: Session,
        persistent: bool,
        handle: Handle,
        em: _Emitter,
        path: str,
        prompt: list[int],
        cached: int,
        started: float,
        gap: float | None,
        speculative: bool,
        chosen: int | None,
        verified: bool | None = None,
        shadow: dict[str, Any] | None = None,
    ) -> None:
        """Send the completion and record the request. ``shadow`` is what the gate would
        have answered on an exact path that had a ready position (for calibration)."""
        text = em.close()
        now = time.perf_counter()
        first = em.first_at or now
        completion = Completion(
            text=text,
            token_ids=list(em.tokens),
            finish_reason=em.finish_reason or "stop",
            path=path,
            session_id=s.id if persistent else None,
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            ttft_ms=(first - handle.arrival) * 1000,
            decided_ms=((em.decided_at or first) - handle.arrival) * 1000,
            e2e_ms=(now - handle.arrival) * 1000,
            foreground_wait_ms=(started - handle.arrival) * 1000,
            background_wait_ms=handle.job.background_wait * 1000 if handle.job is not None else 0.0,
            logit_gap=gap,
            speculative=speculative,
            verified=verified,
            candidate=chosen,
            extra={"forwards_before_first_token": em.forwards_before_first, **({"shadow": shadow} if shadow else {})},
        )
        self.stats.record_request(
            path,
            completion.ttft_ms,
            completion.e2e_ms,
            completion.foreground_wait_ms,
            completion.prompt_tokens,
            cached,
            completion.completion_tokens,
        )
        s.paths[path] += 1
        if persistent and not req.ephemeral and completion.finish_reason != "cancelled":
            s.messages = [*req.messages, {"role": "assistant", "content": text}]
            s.tools = req.tools
            s.turns += 1
            last = req.messages[-1]
            s.last_delta = last.get("content") if isinstance(last.get("content"), str) else None
        handle.put(completion)

    def _after(self, req: Request, s: Session, persistent: bool, prompt: list[int]) -> None:
        """Tidy the session once its request is answered, and queue its idle-time work."""
        if self.prefix_cache is not None and not persistent:
            self.prefix_cache.store(s)
        if req.ephemeral and persistent:
            # Leave only the session's own context: the question was a one-off.
            own = self.template.entry(s.messages, "user", tools=s.tools) if s.messages else []
            self.book.crop(s, common_prefix(s.kv_ids, own))
        for key, rp in list(s.ready.items()):
            if not self.book.valid(s, rp):
                s.ready.pop(key)
                self.book.discard(rp)
        with self._lock:
            s.busy = False
            s.last_used = time.time()
        if persistent and not req.ephemeral:
            self.schedule_pre_position(s)
