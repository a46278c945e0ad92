"""Fast tests of the parts below the engine: text stream, sampling,
template entry, scheduler order."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from headstart.decode.sampling import SamplingParams, accept, candidate_gap, distribution, pick, top_gap
from headstart.decode.textstream import TextStream
from headstart.engine.loop import Job, Scheduler
from headstart.model import HFBackend
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


def test_scheduler_runs_foreground_before_background_and_round_robin() -> None:
    scheduler = Scheduler()
    log: list[str] = []
    inside, gate = threading.Event(), threading.Event()

    def job(name: str, steps: int, wait: bool = False):
        for i in range(steps):
            if wait and i == 0:
                inside.set()
                assert gate.wait(5)
            log.append(f"{name}{i}")
            yield

    scheduler.submit_background("bg", Job(job("b", 3, wait=True)))
    scheduler.start()
    assert inside.wait(5)  # the background job is inside its first chunk
    scheduler.submit(Job(job("x", 2)))
    scheduler.submit(Job(job("y", 2)))
    gate.set()
    assert scheduler.wait_idle(5)
    scheduler.stop()
    assert log == ["b0", "x0", "y0", "x1", "y1", "b1", "b2"]


def test_cancelled_background_job_stops_after_its_chunk() -> None:
    scheduler = Scheduler()
    log: list[int] = []
    inside, go_on = threading.Event(), threading.Event()

    def job():
        for i in range(100):
            log.append(i)
            if i == 0:
                inside.set()
                assert go_on.wait(5)
            yield

    steps = job()
    scheduler.submit_background("k", Job(steps))
    scheduler.start()
    assert inside.wait(5)  # cancelled while it is inside its first chunk
    assert scheduler.cancel_background("k")
    go_on.set()
    assert scheduler.wait_idle(5)
    scheduler.stop()
    assert log == [0]  # it finished the chunk it was in, and no other
    assert steps.gi_frame is None  # and was closed, so it never runs again


def test_wait_idle_returns_only_after_every_jobs_last_step() -> None:
    """A gate answer's completion goes out inside a step and its verification is the next
    step: a wait_idle right after the answer must wait for the verification too, even if
    it looks while the model thread is between the end of a step and the job's re-queue."""
    scheduler = Scheduler()
    log: list[str] = []
    answered, finish = threading.Event(), threading.Event()

    def gate_like():
        answered.set()  # the client hears of the answer here
        assert finish.wait(5)
        yield
        log.append("verified")

    scheduler.start()
    scheduler.submit(Job(gate_like()))
    assert answered.wait(5)
    with scheduler._cond:  # hold the model thread where the step has ended, before the re-queue
        finish.set()
        deadline = time.monotonic() + 0.5
        while scheduler._busy and time.monotonic() < deadline:
            pass
        assert scheduler.wait_idle(5)
        assert log == ["verified"]
    scheduler.stop()
