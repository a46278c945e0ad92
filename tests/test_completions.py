"""``POST /v1/completions`` on the default model with the official client: text or token ids,
streamed and not, echo, logprobs, n, and a session that reuses its KV; each answer checked
against greedy tokens computed directly from the model."""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest

from headstart.model import HFBackend
from tests.apiutil import Served, serve
from tests.test_logits_server import direct

PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def srv(real: HFBackend) -> Iterator[Served]:
    with serve(real) as served:
        yield served


def _text(srv: Served, ids: list[int]) -> str:
    return srv.engine.template.tokenizer.decode(ids, skip_special_tokens=True)


def test_text_and_token_ids_streamed_and_not_equal_the_direct_computation(srv: Served, oa: openai.OpenAI) -> None:
    ids = srv.engine.template.encode(PROMPT)
    expected = _text(srv, direct(srv, ids, 12, {}))
    r = oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(ids) and r.model_extra["headstart"]["path"] == "cold"
    by_ids = oa.completions.create(model="smollm2-135m", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected
    streamed, finish = "", None
    for chunk in oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True):
        streamed += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert streamed == expected and finish == r.choices[0].finish_reason
    assert oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=3, temperature=0,
                                 echo=True).choices[0].text.startswith(PROMPT)


def test_default_length_is_sixteen_tokens_and_n_shares_the_prompt(oa: openai.OpenAI) -> None:
    r = oa.completions.create(model="smollm2-135m", prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 16
    two = oa.completions.create(model="smollm2-135m", prompt="Once upon a time", temperature=0, n=2, max_tokens=16)
    assert [c.text for c in two.choices] == [r.choices[0].text] * 2


def test_logprobs_in_the_legacy_layout(oa: openai.OpenAI) -> None:
    r = oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-6)  # greedy: the most likely one


def test_a_session_reuses_its_kv_and_answers_as_a_one_off(srv: Served, oa: openai.OpenAI) -> None:
    session = {"x-session-id": "raw-text"}
    first = oa.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_headers=session)
    longer = PROMPT + first.choices[0].text + " and"
    second = oa.completions.create(model="smollm2-135m", prompt=longer, max_tokens=8, temperature=0,
                                   extra_headers=session)
    ext = second.model_extra["headstart"]
    assert ext["session_id"] == "raw-text" and ext["path"] == "session"
    assert second.usage.prompt_tokens_details.cached_tokens > len(srv.engine.template.encode(PROMPT)) // 2
    cold = oa.completions.create(model="smollm2-135m", prompt=longer, max_tokens=8, temperature=0)
    assert second.choices[0].text == cold.choices[0].text
    assert srv.engine.get_session("raw-text").messages == []  # the chat transcript is untouched


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "logprobs"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "model": "gpt-3.5-turbo-instruct"}, "model"),
    ],
)
def test_what_it_cannot_do_is_refused_by_name(srv: Served, fields: dict, param: str) -> None:
    r = srv.client.post("/v1/completions", json={"max_tokens": 2, **fields})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param
