"""Tool calls without a tool-capable model: the parser, the stream hold-back, tool_choice
plans and their grammars on a small tool template, schemas refused, and the clear refusal
of a template without tools."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from headstart.decode.grammar import Grammars
from headstart.decode.logits import Chooser
from headstart.decode.sampling import Constraint, SamplingParams
from headstart.engine.engine import Request
from headstart.errors import BadRequest
from headstart.model import HFBackend
from headstart.model.loader import local_folder, resolve
from headstart.session.template import ChatTemplate, TemplateError
from headstart.session.tools import (
    BARE,
    Envelope,
    HoldBack,
    ParsedAnswer,
    ToolChoiceError,
    ToolPlan,
    envelope,
    parse,
    plan_tools,
)

NAMES = {"get_weather", "add"}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
]

# A compact template that declares tools and writes calls the way Qwen2.5's does.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant"
    "{%- for c in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def tool_template() -> ChatTemplate:
    tokenizer = AutoTokenizer.from_pretrained(local_folder(resolve(None)))
    tokenizer.chat_template = TOOL_TEMPLATE
    return ChatTemplate(tokenizer)


def _call(text: str) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in parse(text, NAMES).calls]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '  {"name": "get_weather", "arguments": {"city": "Paris"}}\n',
        '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```',
        '```\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # stopped before the end tag
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # arguments as a JSON string
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    ],
)
def test_every_form_of_one_call_parses(text: str) -> None:
    parsed = parse(text, NAMES)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", {"city": "Paris"})]
    assert parsed.content is None


def test_several_calls_tagged_listed_or_concatenated() -> None:
    want = [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    one = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    two = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert _call(f"<tool_call>\n{one}\n</tool_call>\n<tool_call>\n{two}\n</tool_call>") == want
    assert _call(f"[{one}, {two}]") == want
    assert _call(f"{one}\n{two}") == want
    assert [c.name for c in parse(f"[{one}, {two}]", NAMES, parallel=False).calls] == ["get_weather"]


def test_content_before_tagged_calls_is_kept() -> None:
    parsed = parse('Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', NAMES)
    assert parsed.content == "Let me look.\n" and [c.name for c in parsed.calls] == ["add"]


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is mild.",
        '{"name": "launch_rockets", "arguments": {}}',  # not a declared tool
        '{"name": "get_weather", "arguments": {"city": "Paris"}',  # cut short
        '{"name": "get_weather", "arguments": ["Paris"]}',  # arguments not an object
        '{"name": "get_weather", "arguments": {}, "why": "extra keys"}',
        '{"temperature": 18}',
        '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>\nand then some prose',
        '<tool_call>\nnot json\n</tool_call>',
        '```json\n{"name": "get_weather", "arguments": {}}\n```\nThis calls the weather tool.',
        "",
    ],
)
def test_anything_else_is_plain_content(text: str) -> None:
    parsed = parse(text, NAMES)
    assert parsed.calls == [] and parsed.content == text


def test_a_call_comes_out_in_openai_and_template_shapes() -> None:
    (call,) = parse('{"name": "add", "arguments": {"a": 1, "b": "é"}}', NAMES).calls
    out = call.openai()
    assert out["id"].startswith("call_") and len(out["id"]) > 10 and out["type"] == "function"
    assert out["function"] == {"name": "add", "arguments": '{"a": 1, "b": "é"}'}
    assert json.loads(out["function"]["arguments"]) == call.message()["function"]["arguments"] == {"a": 1, "b": "é"}
    assert parse('{"name": "add", "arguments": {}}', NAMES).calls[0].id != call.id


def _stream(hold: HoldBack, pieces: list[str], calls: bool) -> str:
    return "".join(hold.push(p) for p in pieces) + hold.finish(calls)


def test_hold_back_keeps_a_call_out_of_the_stream() -> None:
    for pieces in (["```", "json", "\n{", '"name"', "}\n```"], ["\n", "<tool", "_call>", "{}"], ["[", "{}]"]):
        hold = HoldBack(active=True)
        assert all(hold.push(p) == "" for p in pieces)
        assert hold.finish(calls=True) == ""
        hold = HoldBack(active=True)
        assert _stream(hold, pieces, calls=False) == "".join(pieces)  # not a call after all: all of it


def test_hold_back_lets_prose_and_code_through_and_stops_at_a_tag() -> None:
    hold = HoldBack(active=True)
    assert hold.push("Sure") == "Sure"
    assert hold.push(", here <tool") == ", here "  # may be the start of a tag: held
    assert hold.push("_call>\n{") == ""
    assert hold.finish(calls=True) == ""
    hold = HoldBack(active=True)
    assert hold.push("``") == "" and hold.push("`py") == "```py"  # a code block, not a call
    assert HoldBack(active=False).push("{") == "{"


def _grammar(plan: ToolPlan):  # type: ignore[no-untyped-def]
    """A string-level checker of the plan's grammar (xgrammar over a one-character vocabulary:
    which texts the grammar admits does not depend on the tokenizer)."""
    import xgrammar as xgr

    assert plan.constraint is not None and plan.constraint.kind == "tool_calls"
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([chr(i) for i in range(32, 127)] + ["\n"])).compile_structural_tag(
        plan.constraint.schema)

    def admits(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return matcher.accept_string(text) and matcher.is_terminated()

    return admits


def _written(template: ChatTemplate, messages: list, name: str, args: dict) -> str:
    """A call as the template itself writes it after ``messages``."""
    start = template.render_text(messages, tools=STRICT_TOOLS, generation_prompt=True)
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    full = template.render_text([*messages, {"role": "assistant", "content": "", "tool_calls": [call]}],
                                tools=STRICT_TOOLS, generation_prompt=False)
    return full[len(start):].partition("<|im_end|>")[0]


WEATHER_ARGS = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"],
              "additionalProperties": False}},
    "required": ["city", "unit"], "additionalProperties": False}
STRICT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
]


def test_the_envelope_is_the_templates_own(tool_template: ChatTemplate) -> None:
    assert envelope(tool_template, STRICT_TOOLS) == Envelope('<tool_call>\n{"name": "', '", "arguments": ',
                                                             "}\n</tool_call>", "")  # calls back to back
    odd = AutoTokenizer.from_pretrained(local_folder(resolve(None)))
    odd.chat_template = TOOL_TEMPLATE.replace('<tool_call>\n{\"name\": \"{{ c.function.name }}\", '
                                              '\"arguments\": {{ c.function.arguments | tojson }}}',
                                              "CALL {{ c.function.name }}({{ c.function.arguments | tojson }})")
    assert envelope(ChatTemplate(odd), STRICT_TOOLS) is BARE  # one the parser would not read back


def test_plans_for_each_tool_choice(tool_template: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    auto = plan_tools(tool_template, TOOLS, None)
    assert auto.parse and auto.constraint is None and auto.names == NAMES
    none = plan_tools(tool_template, TOOLS, "none")
    assert not none.parse and none.read('{"name": "add", "arguments": {}}').calls == []
    assert plan_tools(tool_template, None, None).parse is False
    paris = _written(tool_template, messages, "get_weather", {"city": "Paris", "unit": "celsius"})
    one = _written(tool_template, messages, "add", {"a": 1})

    required = _grammar(plan_tools(tool_template, STRICT_TOOLS, "required"))
    assert required(paris) and required(one) and required(f"{paris}{one}")  # the template's calls, in turn
    assert not required("It is sunny.") and not required("")  # a call, nothing else
    assert not required(paris.replace("celsius", "kelvin"))  # an enum
    assert not required(paris.replace('"city": "Paris", ', ""))  # a required field
    assert not required(paris.replace("get_weather", "launch_rockets"))
    assert not required(one.replace("1", '"one"'))  # non-strict functions follow their schema too
    nested = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P", "unit": "celsius", "where": %s}}' \
             "\n</tool_call>"
    assert required(nested % '{"lat": 1.5}') and not required(nested % '{"lon": 1.5}')
    single = _grammar(plan_tools(tool_template, STRICT_TOOLS, "required", parallel=False))
    assert single(paris) and not single(f"{paris}{one}")

    named = plan_tools(tool_template, STRICT_TOOLS, {"type": "function", "function": {"name": "add"}})
    assert named.names == {"add"} and _grammar(named)(one) and not _grammar(named)(paris)

    strict_auto = plan_tools(tool_template, STRICT_TOOLS, "auto", strict={"get_weather"})
    free = _grammar(strict_auto)
    assert free("It is sunny.") and free(paris) and free(f"Let me look.\n{paris}")
    assert not free(f"Let me look.\n{paris.replace('celsius', 'kelvin')}")  # once opened, a call is valid
    assert strict_auto.read(paris).calls[0].arguments == {"city": "Paris", "unit": "celsius"}
    # a call the grammar did not make (bare JSON) is a call only if its strict arguments validate
    bare = '```json\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "%s"}}\n```'
    assert [c.name for c in strict_auto.read(bare % "celsius").calls] == ["get_weather"]
    assert strict_auto.read(bare % "kelvin") == ParsedAnswer(bare % "kelvin", [])
    assert [c.name for c in strict_auto.read('{"name": "add", "arguments": {"a": "x"}}').calls] == ["add"]


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("choice", ["json_schema", "required", "auto"])
def test_the_chooser_masks_exactly_what_xgrammar_forbids(tool_template: ChatTemplate, choice: str, pad: int) -> None:
    """At every step of a random walk and of a valid answer, the chooser's reshaped logits
    are xgrammar's own apply of the same grammar state (what the mask allowed before the
    numpy unpack, and only that) and leave the logits they shaped raw, with a vocabulary
    that is (``pad`` 0) and one that is not a multiple of the mask's 32-bit words; the
    valid answer ends the grammar."""
    import xgrammar as xgr

    tokenizer = tool_template.tokenizer
    vocab, stop = len(tokenizer) + pad, tool_template.end_of_message
    grammars = Grammars(tokenizer, vocab, {stop})
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    paris = _written(tool_template, messages, "get_weather", {"city": "Paris", "unit": "celsius"})
    if choice == "json_schema":
        constraint, answer = Constraint("json_schema", json.dumps(WEATHER_ARGS)), '{"city": "Paris", "unit": "celsius"}'
    else:
        constraint = plan_tools(tool_template, STRICT_TOOLS, choice, strict={"get_weather"}).constraint
        answer = paris if choice == "required" else f"Let me look.\n{paris}"
    assert constraint is not None
    gen = torch.Generator().manual_seed(pad)
    for script in (None, [*tokenizer.encode(answer, add_special_tokens=False), stop]):
        chooser = Chooser(SamplingParams(constraint=constraint), [], vocab, "cpu", None, grammars.matcher(constraint))
        reference, bitmask = xgr.GrammarMatcher(grammars.compile(constraint)), xgr.allocate_token_bitmask(1, vocab)
        for i in range(len(script) if script else 40):
            logits = torch.randn(vocab, generator=gen)
            if script:
                logits[script[i]] = 100.0  # the answer's token is the best, if allowed
            reference.fill_next_token_bitmask(bitmask)
            expected = logits.clone().unsqueeze(0)
            xgr.apply_token_bitmask_inplace(expected, bitmask)
            before = logits.clone()
            assert torch.equal(chooser.step().apply(logits), expected[0])
            assert torch.equal(logits, before)  # the rules shape a copy: the model's logits stay raw
            token = chooser.choose(logits)
            assert token == int(expected.argmax()) and (script is None or token == script[i])
            assert reference.accept_token(token)
            if reference.is_terminated():
                break
        assert chooser.matcher.terminated == reference.is_terminated() == (script is not None)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("parameters", "strict", "words"),
    [
        ({"type": "object", "properties": {"a": {"type": "nonsense"}}}, False, "cannot be compiled"),
        ({"type": "string"}, False, "must describe an object"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, True, "properties.a.not"),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "credit-card"}}}, True, "format"),
        ({"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}, True, "oneOf"),
    ],
)
def test_schemas_the_grammar_cannot_honour_are_refused_naming_the_field(
    tool_template: ChatTemplate, parameters: dict, strict: bool, words: str
) -> None:
    tools = [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": parameters}}]
    with pytest.raises(ToolChoiceError, match=words) as info:
        plan_tools(tool_template, tools, "auto", strict={"f"} if strict else ())
    assert info.value.param == "tools[1].function.parameters"
    if strict:  # the same schema, not strict: best effort, accepted
        plan_tools(tool_template, tools, "required")


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
        ([*TOOLS, TOOLS[0]], None, "tools"),
        ([{"type": "function", "function": {}}], None, "tools"),
    ],
)
def test_bad_tool_choices_are_refused(tool_template: ChatTemplate, tools, choice, param: str) -> None:
    with pytest.raises(ToolChoiceError) as info:
        plan_tools(tool_template, tools, choice)
    assert info.value.param == param


def test_a_template_without_tools_refuses_them_clearly(tiny: HFBackend, make_engine) -> None:
    template = ChatTemplate(tiny.tokenizer)
    assert not template.supports_tools
    with pytest.raises(TemplateError, match=r"no tool support.*qwen2\.5-coder-0\.5b") as info:
        template.render([{"role": "user", "content": "hi"}], tools=TOOLS)
    assert info.value.param == "tools"
    engine = make_engine(tiny)
    with pytest.raises(TemplateError):
        engine.submit(Request(messages=[{"role": "user", "content": "hi"}], tools=TOOLS))
    with pytest.raises(BadRequest, match="needs tools"):
        engine.submit(Request(messages=[{"role": "user", "content": "hi"}], tool_choice="required"))


@pytest.fixture(scope="module")
def tiny_tools(tiny: HFBackend) -> HFBackend:
    """The tiny model behind the compact tool template: tool grammars on every engine path, fast."""
    tokenizer = AutoTokenizer.from_pretrained(local_folder(resolve(None)))
    tokenizer.chat_template = TOOL_TEMPLATE
    return HFBackend(tiny.model, tokenizer, "tiny-tools")


def _admitted(plan: ToolPlan, text: str) -> bool:
    """Whether ``text`` is a start the plan's grammar admits (an answer may be cut short)."""
    import xgrammar as xgr

    assert plan.constraint is not None
    info = xgr.TokenizerInfo([chr(i) for i in range(32, 127)] + ["\n"])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_structural_tag(plan.constraint.schema))
    return matcher.accept_string(text)


def test_a_tool_grammar_holds_on_the_ready_position_and_the_gate(tiny_tools: HFBackend, make_engine) -> None:
    """The ready position and its sure tail were computed without the grammar; a required call
    that meets them is the same as cold. The gate, forced open, scans the masked cached
    distribution: its answer, first token included, is one the grammar admits."""
    from headstart.decode.sampling import SamplingParams

    engine = make_engine(tiny_tools, sure_gap=0.0)  # every ready position gets a sure tail, unconstrained
    template = ChatTemplate(tiny_tools.tokenizer)
    plan = plan_tools(template, STRICT_TOOLS, "required")
    history = [{"role": "user", "content": "Hello!"}]
    kwargs = {"tools": STRICT_TOOLS, "tool_choice": "required"}
    first = engine.generate(Request(history, SamplingParams(max_tokens=6), session_id="tg", tools=STRICT_TOOLS))
    history.append({"role": "assistant", "content": first.text})
    assert engine.wait_idle(120)
    ready_turn = [*history, {"role": "user", "content": ""}]
    params = SamplingParams(max_tokens=24)
    prompt = template.render(ready_turn, tools=STRICT_TOOLS)
    ready = [rp for rp in engine.sessions.find("tg").ready.values() if rp.ids == prompt]
    assert ready and ready[0].forced  # a sure tail, decoded without the grammar
    warm = engine.generate(Request(ready_turn, params, session_id="tg", **kwargs))
    assert warm.path == "ready_exact"
    cold = engine.generate(Request(ready_turn, params, **kwargs))
    assert warm.token_ids == cold.token_ids
    assert template.decode(warm.token_ids).startswith('<tool_call>\n{"name": "')
    assert _admitted(plan, template.decode(warm.token_ids))
    history = [*ready_turn, {"role": "assistant", "content": warm.text}]
    assert engine.wait_idle(120)
    gate = engine.submit(Request([*history, {"role": "user", "content": "Again."}], params, session_id="tg",
                                 stream=True, gap_threshold=0.0, **kwargs)).result()
    assert gate.path == "gate"
    assert template.decode(gate.token_ids).startswith("<tool_call>") and _admitted(plan, template.decode(
        gate.token_ids))


def test_the_grammar_bench_times_the_choice_under_each_grammar(tiny_tools: HFBackend, make_engine, capsys) -> None:
    """``python -m headstart.bench.grammar``'s side-by-side figure: a line for no rule, the JSON
    schema and, where the template writes calls, each tool grammar."""
    from headstart.bench.grammar import rules_per_token

    rules_per_token(make_engine(tiny_tools, pre_position=False), tiny_tools.info.vocab_size, steps=4)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "headstart, no rule", "headstart, JSON schema", "headstart, tool calls, required (2 strict functions)",
        "headstart, tool calls, auto (2 strict functions)"]
    assert all("ms/token to choose (median of 4)" in line for line in lines)
