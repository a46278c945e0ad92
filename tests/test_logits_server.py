"""logprobs, penalties and logit_bias through the OpenAI door on the default model, checked
against a direct computation over the model's logits, cold and on the session paths
(``ready_exact`` with its sure tail, and the gate's cached distribution)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest
import torch

from headstart.model import HFBackend
from tests.apiutil import Served, serve, settle
from tests.test_logits import reference

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
RULES = {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3}


@pytest.fixture(scope="module")
def srv(real: HFBackend) -> Iterator[Served]:
    with serve(real) as served:
        yield served


def _params(fields: dict) -> object:
    from headstart.decode.sampling import SamplingParams

    bias = tuple(sorted((int(k), float(v)) for k, v in fields.get("logit_bias", {}).items()))
    return SamplingParams(presence_penalty=fields.get("presence_penalty", 0.0),
                          frequency_penalty=fields.get("frequency_penalty", 0.0),
                          repetition_penalty=fields.get("repetition_penalty", 1.0), logit_bias=bias)


def direct(srv: Served, prompt: list[int], n: int, fields: dict, first: torch.Tensor | None = None) -> list[int]:
    """Greedy tokens computed here, from the model's raw logits and the reference rules; the
    first distribution may be given (the gate's cached one)."""
    settle(srv)  # the model thread is idle: this thread may use the backend
    backend, template = srv.engine.backend, srv.engine.template
    stop = {*backend.info.eos_token_ids, template.end_of_message}
    params = _params(fields)
    state = backend.new_state()
    logits = backend.forward(state, prompt)[-1]
    if first is not None:
        logits = first
    out: list[int] = []
    while len(out) < n:
        shaped = reference(logits.tolist(), prompt, out, params)  # type: ignore[arg-type]
        token = max(range(len(shaped)), key=shaped.__getitem__)
        if token in stop:
            break
        out.append(token)
        if first is not None and len(out) == 1:
            state = backend.new_state()
            logits = backend.forward(state, [*prompt, token])[-1]
        else:
            logits = backend.forward(state, [token])[-1]
    return out


def _text(srv: Served, ids: list[int]) -> str:
    return srv.engine.template.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_models_own(srv: Served, oa: openai.OpenAI, stream: bool) -> None:
    kwargs = {"model": "smollm2-135m", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
              "logprobs": True, "top_logprobs": 5}
    if stream:
        entries, text = [], ""
        for chunk in oa.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
            if chunk.choices and chunk.choices[0].logprobs:
                entries += chunk.choices[0].logprobs.content
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    else:
        r = oa.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        entries, text = r.choices[0].logprobs.content, r.choices[0].message.content
    assert len(entries) == 8
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in entries) == text
    settle(srv)
    backend = srv.engine.backend
    prompt = srv.engine.template.render(MESSAGES)
    tokenizer = srv.engine.template.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    state = backend.new_state()
    logits = backend.forward(state, prompt, keep=1)[-1]
    for i, e in enumerate(entries):
        logp = torch.log_softmax(logits.float(), -1)
        top = torch.topk(logp, 5)
        assert len(e.top_logprobs) == 5
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-6
        for got, value in zip(e.top_logprobs, top.values.tolist(), strict=True):
            assert math.isclose(got.logprob, value, abs_tol=1e-4)
        token = int(top.indices[0])  # greedy: the chosen token is the first of the top ones
        assert math.isclose(e.logprob, float(logp[token]), abs_tol=1e-4)
        assert bytes(e.bytes) == bytes(e.top_logprobs[0].bytes)
        if i + 1 < len(entries):
            logits = backend.forward(state, [token])[-1]
    assert ids[: len(entries)] or text == ""


def test_penalties_and_bias_cold_follow_the_reference(srv: Served, oa: openai.OpenAI) -> None:
    prompt = srv.engine.template.render(MESSAGES)
    plain = oa.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=24, temperature=0)
    natural_first = srv.engine.template.encode(plain.choices[0].message.content)[0]
    fields = {**RULES, "logit_bias": {str(natural_first): -100}}
    r = oa.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=24, temperature=0,
                                   extra_body=fields)
    expected = direct(srv, prompt, 24, fields)
    assert r.choices[0].message.content == _text(srv, expected)
    assert expected[0] != natural_first
    assert r.choices[0].message.content != plain.choices[0].message.content


def test_penalties_on_a_ready_exact_turn_equal_cold(srv: Served, oa: openai.OpenAI) -> None:
    """The default predictor prepares an empty next message; sending it hits the ready
    position (and its sure tail, decoded greedily without the rules, as drafts)."""
    session = {"x-session-id": "rules-ready"}
    first = oa.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_headers=session)
    settle(srv, "rules-ready")
    turn = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user",
                                                                                            "content": ""}]
    r = oa.chat.completions.create(model="smollm2-135m", messages=turn, max_tokens=16, temperature=0,
                                   extra_headers=session, extra_body=RULES)
    assert r.model_extra["headstart"]["path"] == "ready_exact"
    assert r.choices[0].message.content == _text(srv, direct(srv, srv.engine.template.render(turn), 16, RULES))


def test_gate_answers_choose_the_first_token_under_the_rules(srv: Served, oa: openai.OpenAI) -> None:
    """With the gate forced open (gap_threshold 0; it answers streamed requests only) the first
    token comes from the cached distribution of the predicted (empty) message, under the real
    request's rules, and its logprob says it was cached."""
    session = {"x-session-id": "rules-gate"}
    first = oa.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_headers=session)
    settle(srv, "rules-gate")
    history = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content}]
    template = srv.engine.template
    predicted = template.render([*history, {"role": "user", "content": ""}])
    turn = [*history, {"role": "user", "content": "And about the mountains?"}]
    settle(srv)
    state = srv.engine.backend.new_state()
    cached = srv.engine.backend.forward(state, predicted)[-1]
    natural = int(cached.argmax())
    fields = {**RULES, "logit_bias": {str(natural): -100}}
    text, entries, ext = "", [], {}
    for chunk in oa.chat.completions.create(model="smollm2-135m", messages=turn, max_tokens=6, temperature=0,
                                            extra_headers=session, logprobs=True, top_logprobs=2, stream=True,
                                            extra_body={"gap_threshold": 0.0, **fields}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            entries += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
        ext = (chunk.model_extra or {}).get("headstart") or ext
    assert ext["path"] == "gate" and ext["first_logprob_cached"] is True
    expected = direct(srv, template.render(turn), 6, fields, first=cached)
    assert expected[0] != natural
    if ext["verified"]:  # the rest is decoded on the real state after the first token
        assert text == _text(srv, expected)
    else:
        assert srv.engine.template.encode(text)[:1] == expected[:1]
    first_lp = entries[0]
    assert math.isclose(first_lp.logprob, float(torch.log_softmax(cached.float(), -1)[expected[0]]), abs_tol=1e-4)


def test_out_of_range_rules_are_refused(oa: openai.OpenAI) -> None:
    for fields, param in [
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
        ({"logit_bias": {"the": 1}}, "logit_bias"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            oa.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=2,
                                       extra_body=fields)
        assert err.value.body["param"] == param, (fields, err.value.body)
