"""The second model (Qwen2.5-Coder-0.5B, qwen2 architecture) in every path of the engine,
tested as the default model is: each exact path gives the tokens of a cold computation.
Qwen decodes several times slower than the default model here: answers are kept short."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.idle.prepos import next_role
from headstart.model import HFBackend
from headstart.model.loader import resolve
from headstart.model.qwen_chunks import QWEN05
from headstart.session.template import ChatTemplate
from tests.helpers import cold, converse, greedy_after, hinted_turn

SHORT = SamplingParams(max_tokens=8)
QUESTIONS = ["What is 2 + 3? Answer with a number.", "And 4 + 4?", "And 10 - 7?"]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SMALL_IDLE = {"continuation_cap": 6, "forced_cap": 4}


def test_qwen_loads_with_both_end_tokens_and_a_tool_template(qwen: HFBackend) -> None:
    tok = qwen.tokenizer
    assert qwen.info.architecture == "qwen2" and qwen.info.vocab_size == 151_936
    ends = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert ends <= set(qwen.info.eos_token_ids)
    template = ChatTemplate(tok)
    assert template.supports_tools and template.end_of_message == tok.convert_tokens_to_ids("<|im_end|>")


def test_qwen_converted_output_layer_is_the_ggufs(qwen: HFBackend) -> None:
    """The output layer is stored apart from the embeddings: the converted cache must hold
    it as the GGUF has it (de-quantised), not a freshly initialised one."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    assert not qwen.model.config.tie_word_embeddings
    source = resolve(QWEN05.name)
    tensors = {t.name: t for t in GGUFReader(source.path / str(source.gguf_file)).tensors}
    for name, weight in (("output.weight", qwen.model.lm_head.weight),
                         ("token_embd.weight", qwen.model.model.embed_tokens.weight)):
        stored = dequantize(tensors[name].data, tensors[name].tensor_type)
        assert torch.equal(weight.detach().cpu(), torch.from_numpy(stored)), name


@pytest.mark.parametrize("linear", ["onednn", "fp16"])  # fp32 weights, and the opt-in fp16 ones
def test_qwen_every_exact_path_equals_cold(qwen: HFBackend, make_engine: Callable[..., Engine], linear: str) -> None:
    engine = make_engine(qwen, gate=False, linear=linear, **SMALL_IDLE)
    outs, prompts = converse(engine, "qwen-paths", QUESTIONS[:2], params=SHORT)
    assert outs[0].path == "cold" and outs[1].path in ("entry", "ready_exact")
    assert outs[0].finish_reason == "stop"  # ended on <|im_end|>, which is never sent
    # ready_exact: the client said what comes next
    third, hit = hinted_turn(engine, "qwen-paths", prompts[1], outs[1].text, QUESTIONS[2], params=SHORT)
    assert hit.path == "ready_exact" and hit.extra["forwards_before_first_token"] == 0
    # session: an edit of the first question keeps only the shared system prompt
    edited = [{"role": "user", "content": "What is 7 + 1? Answer with a number."}]
    redo = engine.generate(Request(messages=edited, params=SHORT, session_id="qwen-paths"))
    assert redo.path == "session" and 0 < redo.cached_tokens < len(ChatTemplate(qwen.tokenizer).render(edited))
    for c, prompt in [*zip(outs, prompts, strict=True), (hit, third), (redo, edited)]:
        assert c.token_ids == cold(engine, prompt, params=SHORT).token_ids


def test_qwen_gate_at_threshold_zero(qwen: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(qwen, gap_threshold=0.0, **SMALL_IDLE)
    outs, prompts = converse(engine, "qwen-gate", QUESTIONS[:2], params=SHORT, stream=True)
    c = outs[1]
    # The predicted message is empty and the real one is not: the gate answers, at threshold 0.
    assert c.path == "gate"
    reference = cold(engine, prompts[1], params=SHORT)
    assert c.speculative and c.extra["forwards_before_first_token"] == 0
    assert engine.gate.counters.fires == 1
    assert (c.token_ids[:1] == reference.token_ids[:1]) == c.verified
    # After its first token the answer continues exactly on the real state.
    assert c.token_ids == greedy_after(engine, prompts[1], c.token_ids[0], SHORT.max_tokens)
    if c.verified:
        assert c.token_ids == reference.token_ids


def test_qwen_tool_call_then_result_in_a_session_equals_cold(
    qwen: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    """A required call (held to the grammar), its result through the pre-paid `tool` entry, and the
    answer after it: each exactly what a cold computation gives."""
    engine = make_engine(qwen, gate=False, **SMALL_IDLE)
    template = ChatTemplate(qwen.tokenizer)
    first = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = SamplingParams(max_tokens=32)  # the grammar writes the call whole, its closing tag included
    call = engine.generate(Request(first, params, session_id="qwen-tools", tools=WEATHER, tool_choice="required"))
    assert call.finish_reason == "tool_calls" and call.text == ""
    ((name, args),) = [(c.name, c.arguments) for c in call.tool_calls]
    assert name == "get_weather" and isinstance(args, dict)
    assert template.decode(call.token_ids).startswith('<tool_call>\n{"name": "get_weather"')
    assert engine.wait_idle(300)
    session = engine.get_session("qwen-tools")
    assert next_role(session.messages) == "tool"
    entry = template.entry(session.messages, "tool", tools=WEATHER)
    assert template.decode(entry).endswith("<tool_response>\n")
    assert session.entry_len == len(entry) and session.kv_ids[: len(entry)] == entry

    second = [
        *first,
        {"role": "assistant", "content": "", "tool_calls": [c.message() for c in call.tool_calls]},
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": json.dumps({"celsius": 18})},
    ]
    answer = engine.generate(Request(second, SamplingParams(max_tokens=12), session_id="qwen-tools", tools=WEATHER))
    assert answer.path in ("entry", "ready_exact") and answer.cached_tokens >= len(entry)
    assert answer.token_ids == cold(engine, second, params=SamplingParams(max_tokens=12), tools=WEATHER).token_ids
    again = cold(engine, first, params=params, tools=WEATHER, tool_choice="required")
    assert again.token_ids == call.token_ids
    assert [(c.name, c.arguments) for c in again.tool_calls] == [(name, args)]
