"""Pre-positioning and the confidence gate: paths, forward counts, verification, preemption."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.model import HFBackend
from tests.helpers import GREEDY, QUESTIONS, cold, converse, greedy_after
from tests.kvmeter import held_kv_bytes


def _after_idle(engine: Engine, session_id: str, n_turns: int = 1):
    outs, prompts = converse(engine, session_id, QUESTIONS[:n_turns], stream=True)
    history = [*prompts[-1], {"role": "assistant", "content": outs[-1].text}]
    return history


def test_threshold_zero_sends_every_differing_request_through_the_gate(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, gap_threshold=0.0)
    outs, prompts = converse(engine, "gate0", QUESTIONS[:4], stream=True)
    assert outs[0].path == "cold"
    gated = [c for c in outs[1:] if c.path == "gate"]
    exact = [c for c in outs[1:] if c.path == "ready_exact"]
    assert len(gated) + len(exact) == 3 and gated
    counters = engine.gate.counters
    assert counters.fires == len(gated)
    assert counters.verified + counters.false_accepts == counters.fires
    for c, prompt in zip(outs[1:], prompts[1:], strict=True):
        reference = cold(engine, prompt)
        if c.path == "gate":
            assert c.speculative and c.extra["forwards_before_first_token"] == 0
            # Verified means the first token is the one a full computation gives; after it
            # the answer continues exactly on the real state either way.
            assert (c.token_ids[:1] == reference.token_ids[:1]) == c.verified
            assert c.token_ids == greedy_after(engine, prompt, c.token_ids[0], GREEDY.max_tokens)
            if c.verified:  # the rest is decoded on the real state after the right token
                assert c.token_ids == reference.token_ids
        else:
            assert c.token_ids == reference.token_ids


def test_a_non_streamed_answer_never_comes_from_the_gate(real: HFBackend, make_engine: Callable[..., Engine]) -> None:
    """The gate forced open (threshold 0) on a client that waits for the whole answer: it
    would gain nothing from an early first token, so every turn is exact (its shadow checks
    still feed the calibration)."""
    engine = make_engine(real, gap_threshold=0.0)
    outs, prompts = converse(engine, "nostream", QUESTIONS[:4])
    assert all(c.path != "gate" and not c.speculative for c in outs)
    assert engine.gate.counters.fires == 0 and engine.gate.counters.declined == 0
    assert len(engine.gate.pairs()) >= 1
    for c, prompt in zip(outs, prompts, strict=True):
        assert c.verified is None
        assert c.token_ids == cold(engine, prompt).token_ids


def test_infinite_threshold_never_fires(real: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(real, gap_threshold=math.inf)
    outs, prompts = converse(engine, "gateinf", QUESTIONS[:3], stream=True)
    assert [c.path for c in outs] == ["cold", "entry", "entry"]
    assert engine.gate.counters.fires == 0
    assert engine.gate.counters.declined == 2
    # the shadow checks still record what the gate would have said, for calibration
    assert len(engine.gate.pairs()) == 2
    for c, prompt in zip(outs, prompts, strict=True):
        assert c.token_ids == cold(engine, prompt).token_ids


def test_gate_can_be_switched_off_per_request_and_per_session(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, gap_threshold=0.0)
    history = _after_idle(engine, "switch")
    messages = [*history, {"role": "user", "content": "Something completely different: name a fruit."}]
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="switch", gate=False, stream=True))
    assert c.path == "entry"
    assert engine.wait_idle(300)
    engine.get_session("switch").settings.gate = False
    messages = [*messages, {"role": "assistant", "content": c.text}, {"role": "user", "content": "Another one?"}]
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="switch", stream=True))
    assert c.path == "entry"
    assert engine.gate.counters.fires == 0


def test_fast_answer_hit_returns_a_whole_candidate_with_no_decode(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, gate=False)
    history = _after_idle(engine, "fast")
    question = "Is Paris in France? Answer yes or no."
    session = engine.get_session("fast")
    session.settings.hint = question
    engine.schedule_pre_position(session)
    assert engine.wait_idle(300)
    candidates = ["Yes, it is.", "No, it is not."]
    messages = [*history, {"role": "user", "content": question}]
    forwards = engine.stats.forward_calls
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="fast", fast_answer=candidates))
    assert c.path == "ready_exact"
    assert c.text in candidates and c.finish_reason == "stop"
    assert engine.stats.forward_calls == forwards  # no prefill, no decode step at all
    reference = cold(engine, messages, fast_answer=candidates)
    assert reference.path == "cold" and reference.text == c.text


def test_fast_answer_through_the_gate_is_verified_before_the_completion(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    """A streamed candidate answer goes out at once; the completion that follows says
    whether the full computation picks the same candidate."""
    engine = make_engine(real, gap_threshold=0.0)
    history = _after_idle(engine, "fastgate")
    messages = [*history, {"role": "user", "content": "Is Berlin in France? Answer yes or no."}]
    candidates = ["Yes", "No"]
    handle = engine.submit(
        Request(messages=messages, params=GREEDY, session_id="fastgate", fast_answer=candidates, stream=True)
    )
    items = list(handle)
    c = items[-1]
    assert c.path == "gate" and c.speculative and c.text in candidates
    assert items[0].text == c.text  # the whole answer came before the verification
    assert c.extra["forwards_before_first_token"] == 0
    assert engine.gate.counters.fires == 1
    assert engine.gate.counters.verified + engine.gate.counters.false_accepts == 1
    assert c.verified == (cold(engine, messages, fast_answer=candidates).text == c.text)


def test_foreground_request_preempts_background_within_one_chunk(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    # A long predicted message gives the background plenty of chunks to interrupt.
    engine = make_engine(
        real, gate=False, predictor="continuation", continuation_cap=400, forced_cap=64, background_chunk=8
    )
    history = _after_idle(engine, "long", n_turns=1)
    other = _after_idle(engine, "other", n_turns=1)
    session = engine.get_session("long")
    session.settings.hint = None
    scheduler, book = engine.scheduler, engine.book
    # Chunks are counted at two moments: when the request is queued, and when its first
    # model call starts. Between them at most the chunk already running may end.
    at: dict[str, int] = {}
    submit, feed = scheduler.submit, book.feed

    def counted_submit(job):  # type: ignore[no-untyped-def]
        submit(job)
        at["queued"] = scheduler.background_chunks

    def counted_feed(s, ids, *, background, keep=1):  # type: ignore[no-untyped-def]
        if not background and s.id == "other":
            at.setdefault("first_step", scheduler.background_chunks)
        return feed(s, ids, background=background, keep=keep)

    started = scheduler.background_chunks
    engine.schedule_pre_position(session)
    deadline = time.monotonic() + 60
    while scheduler.background_chunks < started + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.background_chunks >= started + 3, "the new background job should be under way"
    assert scheduler.has_background("long"), "and still running"
    scheduler.submit, book.feed = counted_submit, counted_feed  # type: ignore[method-assign]
    messages = [*other, {"role": "user", "content": QUESTIONS[1]}]
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="other"))
    del scheduler.submit, book.feed
    assert at["first_step"] - at["queued"] <= 1, at
    assert scheduler.has_background("long"), "the request went ahead of the background job, which is not done"
    assert c.token_ids == cold(engine, messages).token_ids
    # and a request on the session being pre-positioned takes it over and reuses its KV
    messages = [*history, {"role": "user", "content": QUESTIONS[1]}]
    c = engine.generate(Request(messages=messages, params=GREEDY, session_id="long"))
    assert c.path in ("entry", "session") and c.cached_tokens > 0
    assert c.token_ids == cold(engine, messages).token_ids


def test_sampled_requests_on_ready_positions_stay_seeded(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, gate=False)
    history = _after_idle(engine, "sampled-ready")
    session = engine.get_session("sampled-ready")
    session.settings.hint = QUESTIONS[1]
    engine.schedule_pre_position(session)
    assert engine.wait_idle(300)
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=7)
    messages = [*history, {"role": "user", "content": QUESTIONS[1]}]
    c = engine.generate(Request(messages=messages, params=params, session_id="sampled-ready"))
    assert c.path == "ready_exact"
    assert c.token_ids == cold(engine, messages, params=params).token_ids


def test_background_tokens_are_accounted(real: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(real, gate=False)
    converse(engine, "acct", QUESTIONS[:3])
    bg = engine.stats.snapshot()["background_tokens"]
    assert bg["computed"] > 0 and bg["reused"] > 0
    parked = sum(sum(rp.background) for rp in engine.get_session("acct").ready.values())
    unused = sum(engine.get_session("acct").kv_background)
    assert bg["computed"] == bg["reused"] + bg["wasted"] + parked + unused


def test_engine_report_has_every_counter(tiny: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(tiny, gap_threshold=0.0)
    converse(engine, "report", ["hi", "again"], params=SamplingParams(max_tokens=3), stream=True)
    report = engine.report()
    assert report["requests"] == 2 and sum(report["paths"].values()) == 2
    assert set(report["gate"]) >= {"fires", "verified", "false_accepts", "threshold", "precision", "keys", "target"}
    assert set(report["gate"]["keys"]) == {"session:report", "server"}
    # The report's resident KV is what the tensors hold (measured apart from its count).
    assert report["kv"]["resident_bytes"] == held_kv_bytes(engine, pinned=False) > 0
    assert report["background_tokens"]["computed"] > 0
    assert report["foreground_wait_ms"]["n"] == 2


def test_the_default_gate_starts_closed_and_opens_once_its_bound_holds(
    tiny: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    """The guaranteed gate (no fixed threshold) on a fresh engine: closed, saying why, while
    the shadow checks of the exact paths accrue; open as soon as the bound over them reaches
    the target, and from then on a streamed turn may be answered by the gate, verified."""
    from headstart.engine.gate import min_evidence

    engine = make_engine(tiny, gate_target=0.6)
    need = min_evidence(0.6, 0.95)
    session = "accrue"
    outs, _ = converse(engine, session, [f"question {i}" for i in range(need + 4)],
                       params=SamplingParams(max_tokens=2), stream=True)
    paths = [c.path for c in outs]
    first_gate = paths.index("gate")
    evidence_before = sum(1 for c in outs[:first_gate] if "shadow" in c.extra)
    assert evidence_before >= need  # never before the bound could hold
    assert all(c.verified is None for c in outs[:first_gate])
    assert all(isinstance(c.verified, bool) for c in outs if c.path == "gate")
    decision = engine.gate_decision(engine.get_session(session))
    assert decision.threshold is not None and decision.key in ("session:accrue", "server")
    fresh = make_engine(tiny, gate_target=0.6)
    fresh.create_session("new")
    closed = fresh.gate_decision(fresh.get_session("new"))
    assert closed.threshold is None and "too little evidence" in (closed.reason or "")
