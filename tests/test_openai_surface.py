"""The OpenAI surface a client meets: every request field implemented or refused by name,
advisory fields accepted, unknown ones named in the answer, model names as vLLM answers
them, clear words for images. Official ``openai`` client against a real server on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import openai
import pytest

from headstart.model import HFBackend
from headstart.server import schemas
from tests.apiutil import Served, serve

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def srv(real: HFBackend) -> Iterator[Served]:
    with serve(real, served_model_names=("house-model", "smollm2-135m"), engine={"pre_position": False}) as served:
        yield served


def _post(srv: Served, **fields: object) -> httpx.Response:
    return srv.client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, **fields})


def test_model_names_are_the_served_ones(srv: Served, oa: openai.OpenAI) -> None:
    assert [m.id for m in oa.models.list().data] == ["house-model", "smollm2-135m"]
    assert oa.models.retrieve("smollm2-135m").id == "smollm2-135m"
    r = oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2, temperature=0)
    assert r.model == "smollm2-135m"
    assert _post(srv).json()["model"] == "house-model"  # no model named: the first name
    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model="gpt-4", messages=HI, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert "gpt-4" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        oa.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("name", sorted(schemas.REFUSED))
def test_every_refused_field_is_a_400_naming_it(srv: Served, name: str) -> None:
    r = _post(srv, **{name: True})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and error["code"] == "unsupported_parameter"
    assert name in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"n": 0}, "n"),
    ],
)
def test_out_of_range_values_are_refused_as_openai_refuses_them(
    srv: Served, fields: dict[str, object], param: str
) -> None:
    r = _post(srv, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_advisory_fields_are_accepted_and_unknown_ones_named(
    srv: Served, oa: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    advisory = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"]}
    r = oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2, temperature=0,
                                   **advisory)  # type: ignore[arg-type]
    assert r.model_extra["headstart"]["ignored_fields"] == []
    with caplog.at_level(logging.WARNING, logger="headstart.server"):
        for _ in range(2):
            r = oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2, temperature=0,
                                           extra_body={"zz_made_up": 1, "another_one": "x"})
            assert r.model_extra["headstart"]["ignored_fields"] == ["another_one", "zz_made_up"]
        stream = oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=2, temperature=0,
                                            stream=True, extra_body={"zz_made_up": 1})
        last = list(stream)[-1]
        assert last.model_extra["headstart"]["ignored_fields"] == ["zz_made_up"]
    warnings = [rec.getMessage() for rec in caplog.records if "zz_made_up" in rec.getMessage()]
    assert len(warnings) <= 1  # logged once per server process (none if an earlier test logged it)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "image input is not supported"),
        ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], "audio input is not supported"),
        ([{"type": "text", "text": 5}], "part 0 must be"),
        (5, "content must be a string, a list of text parts, or null, not int"),
        ({"text": "hi"}, "not dict"),
    ],
)
def test_image_parts_and_non_string_content_get_clear_words(srv: Served, content: object, words: str) -> None:
    r = srv.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages[0].content"
    assert words in error["message"] and "Input should be" not in error["message"]


def test_n_choices_come_from_one_prefill(srv: Served, oa: openai.OpenAI) -> None:
    stats = srv.engine.stats
    greedy = oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=6, temperature=0)
    before = stats.forward_calls
    r = oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=6, temperature=1.0, seed=7, n=3,
                                   logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # One prefill, then one forward per token of each choice but its last (fed too when a stop token ended it).
    lengths = [len(c.logprobs.content) for c in r.choices]
    assert sum(lengths) == r.usage.completion_tokens
    feeds = sum(n - (c.finish_reason == "length") for n, c in zip(lengths, r.choices, strict=True))
    assert stats.forward_calls - before == 1 + feeds
    assert len({c.message.content for c in r.choices}) > 1  # sampled choices differ
    same = oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=6, temperature=0, n=2)
    assert [c.message.content for c in same.choices] == [greedy.choices[0].message.content] * 2
    assert same.usage.prompt_tokens == greedy.usage.prompt_tokens
    text: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in oa.chat.completions.create(model="smollm2-135m", messages=HI, max_tokens=6, temperature=1.0,
                                            seed=7, n=3, stream=True):
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert [text[i] for i in range(3)] == [c.message.content for c in r.choices]  # same seed, same draws


def test_n_in_a_session_is_a_400_saying_why(srv: Served) -> None:
    r = srv.client.post("/v1/chat/completions", json={"messages": HI, "n": 2, "max_tokens": 2},
                        headers={"x-session-id": "n-session"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "n" and "session holds one continuation" in error["message"]
