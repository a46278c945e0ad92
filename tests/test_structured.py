"""Structured outputs on the default model with the official client: JSON mode parses, a
schema validates, streamed or not, and a constrained session turn (ready position, gate)
equals the same constrained turn cold."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from headstart.model import HFBackend
from tests.apiutil import Served, serve, settle

PROMPTS = [
    "Describe a cat.", "Give me a recipe for pancakes.", "What is the capital of France?", "List three colours.",
    "Tell me about the moon.", "Who wrote Hamlet?", "Summarise the water cycle.", "Invent a superhero.",
    "What is 12 times 7?", "Describe your ideal holiday.", "Name a programming language and its creator.",
    "Plan a birthday party.", "What is the weather like in spring?", "Give a book recommendation.",
    "Explain photosynthesis briefly.", "Describe a car.", "What do bees make?", "Translate 'hello' to French.",
    "Write a haiku about autumn.", "Name two planets.",
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string",
                                                                                   "maxLength": 20}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def srv(real: HFBackend) -> Iterator[Served]:
    with serve(real) as served:
        yield served


def test_json_mode_gives_json_on_twenty_prompts(real: HFBackend, oa: openai.OpenAI) -> None:
    """JSON mode's promise as OpenAI states it: the output is JSON, and an answer cut by
    ``max_tokens`` may be unfinished. Each answer is checked by a JSON grammar built here
    from xgrammar's own JSON grammar (not through headstart.decode.grammar): a finished answer parses
    to an object; a cut one is a prefix the JSON grammar accepts. The 135M model loops inside
    a long string on some of these prompts, so not every answer finishes: at least half must."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(real.tokenizer, vocab_size=real.info.vocab_size)
    json_grammar = xgr.GrammarCompiler(info).compile_builtin_json_grammar()
    system = {"role": "system", "content": 'Answer in JSON: one key, "answer", whose value is one short sentence.'}
    finished = 0
    for prompt in PROMPTS:
        r = oa.chat.completions.create(model="smollm2-135m", max_tokens=96, temperature=0,
                                       messages=[system, {"role": "user", "content": prompt}],
                                       response_format={"type": "json_object"})
        text, reason = r.choices[0].message.content or "", r.choices[0].finish_reason
        assert text and xgr.GrammarMatcher(json_grammar).accept_string(text), (prompt, text)
        if reason == "stop":
            finished += 1
            assert isinstance(json.loads(text), dict), (prompt, text)
        else:
            assert reason == "length", (prompt, reason)
    print(f"JSON mode: {finished} of {len(PROMPTS)} answers finished within 96 tokens")
    assert finished >= len(PROMPTS) // 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_with_required_fields_enums_and_nesting_validates(oa: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "Invent a user of a web site, with their address."}]
    kwargs = {"model": "smollm2-135m", "messages": messages, "max_tokens": 120, "temperature": 0,
              "response_format": SCHEMA_FORMAT}
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    else:
        text = oa.chat.completions.create(**kwargs).choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)


def test_sampled_json_validates_too(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "A user, please."}],
                                   max_tokens=120, temperature=1.0, seed=3, n=3, response_format=SCHEMA_FORMAT)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_a_constrained_session_turn_equals_the_same_turn_cold(srv: Served, oa: openai.OpenAI) -> None:
    """The ready position (empty predicted message) and its sure tail were computed without the
    grammar; a constrained turn that meets it must still be the constrained cold answer. The
    gate, forced open, scans the masked cached distribution: its first token obeys the grammar."""
    session = {"x-session-id": "json-session"}
    history = [{"role": "user", "content": "Hello!"}]
    first = oa.chat.completions.create(model="smollm2-135m", messages=history, max_tokens=8, temperature=0,
                                       extra_headers=session)
    history.append({"role": "assistant", "content": first.choices[0].message.content})
    settle(srv, "json-session")
    ready_turn = [*history, {"role": "user", "content": ""}]
    kwargs = {"model": "smollm2-135m", "max_tokens": 120, "temperature": 0, "response_format": SCHEMA_FORMAT}
    warm = oa.chat.completions.create(messages=ready_turn, extra_headers=session, **kwargs)
    assert warm.model_extra["headstart"]["path"] == "ready_exact"
    cold = oa.chat.completions.create(messages=ready_turn, **kwargs)
    assert warm.choices[0].message.content == cold.choices[0].message.content
    jsonschema.validate(json.loads(warm.choices[0].message.content), PERSON)
    history = [*ready_turn, {"role": "assistant", "content": warm.choices[0].message.content}]
    settle(srv, "json-session")
    gate_turn = [*history, {"role": "user", "content": "Another one, please."}]
    text, ext = "", {}
    for chunk in oa.chat.completions.create(messages=gate_turn, extra_headers=session, stream=True,
                                            extra_body={"gap_threshold": 0.0}, **kwargs):
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        ext = (chunk.model_extra or {}).get("headstart") or ext
    assert ext["path"] == "gate"  # the gate answers streamed requests only
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
         "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
            "type": "object", "properties": {"a": {"type": "string", "not": {"const": "b"}}}}}}, "response_format"),
    ],
)
def test_formats_it_cannot_honour_are_400s(srv: Served, fmt: dict, param: str) -> None:
    r = srv.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
