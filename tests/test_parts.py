"""Fast tests of the parts below the engine: text stream, sampling,
template entry, the step loop's budget and order."""

from __future__ import annotations

import threading

import pytest
import torch

from headstart.decode.sampling import SamplingParams, accept, candidate_gap, distribution, pick, top_gap
from headstart.decode.textstream import TextStream
from headstart.engine.engine import Engine, EngineConfig
from headstart.engine.loop import Job, Scheduler
from headstart.model import HFBackend
from headstart.session.session import Session
from headstart.session.template import ChatTemplate, TemplateError, common_prefix


def _ids(backend: HFBackend, text: str) -> list[int]:
    return backend.tokenizer.encode(text, add_special_tokens=False)


def test_text_stream_holds_back_a_possible_stop_string(tiny: HFBackend) -> None:
    stream = TextStream(tiny.tokenizer, stop=("END",))
    out = "".join(stream.push(t) for t in _ids(tiny, "hello there EN"))
    assert out == "hello there "  # "EN" could still become "END"
    out += "".join(stream.push(t) for t in _ids(tiny, "D and more"))
    assert stream.stopped and out == "hello there " and stream.text == "hello there "


def test_text_stream_releases_held_text_at_the_end(tiny: HFBackend) -> None:
    stream = TextStream(tiny.tokenizer, stop=("STOP",))
    out = "".join(stream.push(t) for t in _ids(tiny, "almost ST"))
    assert not stream.stopped
    assert out + stream.finish() == "almost ST"


def test_text_stream_waits_for_whole_characters(tiny: HFBackend) -> None:
    stream = TextStream(tiny.tokenizer)
    text = "café 日本語 ok"
    out = "".join(stream.push(t) for t in _ids(tiny, text)) + stream.finish()
    assert out == text and "\ufffd" not in out


def test_greedy_pick_and_gap() -> None:
    logits = torch.tensor([0.0, 5.0, 3.5, -1.0])
    assert pick(logits, SamplingParams(), None) == 1
    assert top_gap(logits) == (1, 1.5)
    index, gap = candidate_gap(logits, torch.tensor([2, 3]))
    assert (index, gap) == (0, 4.5)
    assert candidate_gap(logits, torch.tensor([2, 2]))[1] == 0.0  # same first token: no signal


def test_top_p_keeps_the_nucleus_only() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = distribution(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert probs[2] == 0 and probs[3] == 0
    assert torch.allclose(probs[:2], torch.tensor([0.625, 0.375]))


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(1000)
    params = SamplingParams(temperature=1.0, seed=3)
    a = [pick(logits, params, g) for g in [params.generator("cpu")] for _ in range(5)]
    b = [pick(logits, params, g) for g in [params.generator("cpu")] for _ in range(5)]
    assert a == b


def test_speculative_acceptance_rate_is_min_one_p_over_q() -> None:
    target = torch.log(torch.tensor([0.2, 0.8]))
    draft = torch.log(torch.tensor([0.8, 0.2]))
    params = SamplingParams(temperature=1.0, seed=0)
    gen = params.generator("cpu")
    accepted = sum(accept(target, draft, 0, params, gen) for _ in range(4000)) / 4000
    assert abs(accepted - 0.25) < 0.03  # p/q = 0.2/0.8
    assert all(accept(target, draft, 1, params, gen) for _ in range(50))  # p/q > 1
    assert accept(target, draft, 1, SamplingParams(), None)  # greedy: argmax agrees
    assert not accept(target, draft, 0, SamplingParams(), None)


def test_entry_is_the_common_part_of_two_renderings(tiny: HFBackend) -> None:
    template = ChatTemplate(tiny.tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    entry = template.entry(messages)
    following = template.render([*messages, {"role": "user", "content": "next question"}])
    assert following[: len(entry)] == entry
    assert template.decode(entry).endswith("<|im_end|>\n<|im_start|>user\n")
    assert common_prefix(entry, template.render(messages, generation_prompt=False)) > 0
    with pytest.raises(TemplateError):
        template.render(messages, tools=[{"type": "function", "function": {"name": "f"}}])


def _loop_parts(backend: HFBackend, step_tokens: int) -> tuple[Scheduler, Engine]:
    """A step loop on a (not started) engine's book, driven one step at a time by the test."""
    engine = Engine(backend, config=EngineConfig(pre_position=False))
    return Scheduler(engine.book, engine.stats, step_tokens), engine


def _feeding(engine: Engine, s: Session, ids: list[int], background: bool, out: list[torch.Tensor]):
    out.append((yield from engine.book.feed(s, ids, background=background))[-1])


def test_step_loop_fills_its_budget_decodes_then_prefills_then_background(tiny: HFBackend) -> None:
    loop, engine = _loop_parts(tiny, step_tokens=8)
    pool = engine.pool
    decode, prefill, idle = (Session(name, pool) for name in ("decode", "prefill", "idle"))
    got: list[torch.Tensor] = []
    loop.submit_background("idle", Job(_feeding(engine, idle, list(range(10, 20)), True, got)))
    loop.submit(Job(_feeding(engine, prefill, list(range(100, 120)), False, got)))
    loop.submit(Job(_feeding(engine, decode, [5], False, got)))
    for _ in range(4):
        assert loop._step()
    steps = engine.stats.snapshot()["steps"]
    # step 1: the decode's token and 7 prefill tokens; then 8 prefill; then the prefill's
    # last 5 and 3 idle tokens in the leftover; then the idle job alone.
    assert list(engine.stats.step_tokens) == [8, 8, 8, 7]
    assert list(engine.stats.step_background) == [0, 0, 3, 7]
    assert list(engine.stats.step_sequences) == [2, 1, 2, 1]
    assert steps["max_sequences"] == 2
    assert (len(decode.kv_ids), len(prefill.kv_ids), len(idle.kv_ids)) == (1, 20, 10)
    assert idle.kv_background == b"\x01" * 10 and prefill.kv_background == bytes(20)
    assert len(got) == 3 and loop.idle()
    # the prefill in chunks of 7, 8 and 5 gives the greedy pick of one whole forward
    ref: list[torch.Tensor] = []
    loop.submit(Job(_feeding(engine, Session("again", pool), list(range(100, 120)), False, ref)))
    loop.step_tokens = 64
    assert loop._step()
    assert int(got[1].argmax()) == int(ref[0].argmax())


def test_every_running_decode_gets_its_token_past_the_budget(tiny: HFBackend) -> None:
    loop, engine = _loop_parts(tiny, step_tokens=2)
    got: list[torch.Tensor] = []
    for i in range(5):
        loop.submit(Job(_feeding(engine, Session(f"d{i}", engine.pool), [i + 3], False, got)))
    loop.submit_background("idle", Job(_feeding(engine, Session("idle", engine.pool), [7, 8], True, got)))
    assert loop._step()
    assert list(engine.stats.step_sequences) == [5] and list(engine.stats.step_background) == [0]
    assert len(got) == 5 and not loop.idle()  # the idle job had no budget left


def test_cancelled_background_job_stops_after_its_step(tiny: HFBackend) -> None:
    loop, engine = _loop_parts(tiny, step_tokens=4)
    s = Session("bg", engine.pool)

    def job():
        for i in range(100):
            yield from engine.book.feed(s, [i + 1], background=True)

    steps = job()
    loop.submit_background("k", Job(steps))
    assert loop._step() and s.kv_ids == [1]
    assert loop.cancel_background("k")
    loop._step()
    assert s.kv_ids == [1]  # it ran the step it was in, and no other
    assert steps.gi_frame is None  # and was closed, so it never runs again
    assert engine.stats.background.computed == 1 and s.kv_background == b"\x01"


def test_a_submit_starts_its_request_only_while_no_other_is_in_flight(tiny: HFBackend) -> None:
    """``Scheduler.submit``: with nothing in flight, the submitting thread admits the request
    and runs it to its first need; with a request in flight, it only queues it, and the
    loop's next step starts it (so doors never keep the model thread from its forwards)."""
    loop, engine = _loop_parts(tiny, step_tokens=8)
    loop._on = True  # as if started, with no model thread: this test alone holds the step
    started: list[str] = []
    got: list[torch.Tensor] = []

    def request(name: str, ids: list[int]):  # type: ignore[no-untyped-def]
        started.append(name)
        yield from _feeding(engine, Session(name, engine.pool), ids, False, got)

    loop.submit(Job(request("a", [1, 2, 3])))
    assert started == ["a"] and not loop._queued and loop._running[0].need is not None
    loop.submit(Job(request("b", [4, 5])))
    assert started == ["a"] and len(loop._queued) == 1  # a is in flight: b waits for the step
    assert loop._step()
    assert started == ["a", "b"] and len(got) == 2 and loop.idle()
    assert list(engine.stats.step_sequences) == [2]  # both in the one forward


def test_wait_idle_returns_only_after_every_jobs_last_step(tiny: HFBackend) -> None:
    """A gate answer's completion goes out before its verification forward, a step later:
    a wait_idle right after the answer must wait for the verification too."""
    loop, engine = _loop_parts(tiny, step_tokens=8)
    log: list[str] = []
    answered = threading.Event()
    s = Session("gate", engine.pool)

    def gate_like():
        answered.set()  # the client hears of the answer here
        yield from engine.book.feed(s, [4, 5, 6], background=False)
        log.append("verified")

    loop.start()
    try:
        loop.submit(Job(gate_like()))
        assert answered.wait(5)
        assert loop.wait_idle(30)
        assert log == ["verified"]
    finally:
        loop.stop()


def test_a_short_prefill_never_waits_behind_a_long_cold_one(tiny: HFBackend) -> None:
    loop, engine = _loop_parts(tiny, step_tokens=8)
    got: list[torch.Tensor] = []
    long, short = Session("long", engine.pool), Session("short", engine.pool)
    loop.submit(Job(_feeding(engine, long, list(range(200, 240)), False, got)))
    loop.submit(Job(_feeding(engine, short, [7, 8, 9], False, got)))
    assert loop._step()
    assert short.kv_ids == [7, 8, 9] and len(got) == 1  # its whole delta in the first step
    assert len(long.kv_ids) == 5  # the long prompt took the rest of the budget
    while not loop.idle():
        loop._step()
    assert len(long.kv_ids) == 40 and len(got) == 2
