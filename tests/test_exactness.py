"""Correctness first: every exact path gives the tokens of a cold computation (greedy)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from headstart.engine.engine import Engine, Request
from headstart.model import HFBackend
from headstart.session.template import ChatTemplate, common_prefix
from tests.helpers import GREEDY, QUESTIONS, cold, converse, hinted_turn


def test_session_turns_equal_cold_without_idle_work(real: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(real, pre_position=False, gate=False)
    outs, prompts = converse(engine, "plain", QUESTIONS)
    assert [c.path for c in outs] == ["cold"] + ["session"] * (len(QUESTIONS) - 1)
    for c, prompt in zip(outs, prompts, strict=True):
        assert c.token_ids == cold(engine, prompt).token_ids
    assert all(c.cached_tokens > 0 for c in outs[1:])


def test_second_turn_reuses_exactly_the_shared_prefix(real: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(real, pre_position=False, gate=False)
    template = ChatTemplate(real.tokenizer)
    outs, prompts = converse(engine, "prefix", QUESTIONS[:2])
    first = template.render(prompts[0])
    second = template.render(prompts[1])
    assert outs[0].finish_reason == "stop"  # ended on end-of-message, which is never fed
    held = first + outs[0].token_ids
    assert outs[1].cached_tokens == common_prefix(second, held)
    assert outs[1].cached_tokens > len(first)


def test_editing_an_earlier_message_recomputes_from_the_first_difference(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, pre_position=False, gate=False)
    template = ChatTemplate(real.tokenizer)
    outs, prompts = converse(engine, "edit", QUESTIONS[:3])
    edited = [dict(m) for m in prompts[2]] + [{"role": "assistant", "content": outs[2].text}]
    edited[0]["content"] = "What is the capital of Spain? Answer in one sentence."
    edited.append({"role": "user", "content": "And its population?"})
    held = engine.get_session("edit").kv_ids.copy()
    c = engine.generate(Request(messages=edited, params=GREEDY, session_id="edit"))
    assert c.path == "session"
    assert c.cached_tokens == common_prefix(template.render(edited), held)
    assert c.cached_tokens < len(template.render(prompts[0]))
    assert c.token_ids == cold(engine, edited).token_ids


@pytest.mark.parametrize("linear", ["onednn", "fp16"])  # fp32 weights, and the opt-in fp16 ones
def test_every_exact_path_equals_cold(real: HFBackend, make_engine: Callable[..., Engine], linear: str) -> None:
    """Pre-positioning on, gate off: turns take `entry` (or `ready_exact` when the predicted
    message was right) and each equals a cold computation."""
    engine = make_engine(real, gate=False, linear=linear)
    outs, prompts = converse(engine, "prepos", QUESTIONS)
    assert outs[0].path == "cold"
    assert all(c.path in ("entry", "ready_exact") for c in outs[1:])
    for c, prompt in zip(outs, prompts, strict=True):
        assert c.token_ids == cold(engine, prompt).token_ids


def test_ready_exact_with_a_hint_equals_cold_and_needs_no_forward(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, gate=False)
    outs, prompts = converse(engine, "hinted", QUESTIONS[:1])
    messages, c = hinted_turn(engine, "hinted", prompts[0], outs[0].text, QUESTIONS[1])
    assert c.path == "ready_exact"
    assert c.extra["forwards_before_first_token"] == 0
    assert c.cached_tokens == c.prompt_tokens
    assert c.token_ids == cold(engine, messages).token_ids


@pytest.mark.parametrize("temperature", [0.7])
def test_sampled_turns_are_reproducible_with_a_seed(
    real: HFBackend, make_engine: Callable[..., Engine], temperature: float
) -> None:
    from headstart.decode.sampling import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=temperature, seed=1234)
    engine = make_engine(real, pre_position=False)
    outs, prompts = converse(engine, "sampled", QUESTIONS[:2], params=params)
    for c, prompt in zip(outs, prompts, strict=True):
        assert c.token_ids == cold(engine, prompt, params=params).token_ids


def test_cold_equals_transformers_generate(real: HFBackend, make_engine: Callable[..., Engine]) -> None:
    """The reference every exactness test uses (a one-off request on the engine) against an
    outside oracle: transformers' own greedy ``generate`` on the same weights and prompt,
    so a bug shared by the engine's paths cannot hide behind its own reference."""
    import torch

    engine = make_engine(real, pre_position=False, gate=False)
    stop = [*real.info.eos_token_ids, engine.template.end_of_message]
    for question in QUESTIONS[:2]:
        messages = [{"role": "user", "content": question}]
        prompt = engine.template.render(messages)
        ids = torch.tensor([prompt], device=real.device)
        with torch.inference_mode():
            out = real.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=GREEDY.max_tokens, eos_token_id=stop, pad_token_id=stop[0])
        oracle = out[0, len(prompt):].tolist()
        while oracle and oracle[-1] in stop:  # generate keeps the stop token; the engine never emits it
            oracle.pop()
        assert cold(engine, messages).token_ids == oracle
