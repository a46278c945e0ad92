"""Tool calls without a tool-capable model: the parser, the stream hold-back, tool_choice
plans on a small tool template, and the clear refusal of a template without tools."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from headstart.engine.engine import BadRequest, Request
from headstart.model import HFBackend
from headstart.model.loader import local_folder, resolve
from headstart.session.template import ChatTemplate, TemplateError
from headstart.session.tools import HoldBack, ToolChoiceError, parse, plan_tools

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


def test_plans_for_each_tool_choice(tool_template: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    auto = plan_tools(tool_template, messages, TOOLS, None)
    assert auto.parse and not auto.prefix and auto.names == NAMES
    none = plan_tools(tool_template, messages, TOOLS, "none")
    assert not none.parse and none.read('{"name": "add", "arguments": {}}').calls == []
    required = plan_tools(tool_template, messages, TOOLS, "required")
    assert tool_template.decode(required.prefix) == '<tool_call>\n{"name": "'
    named = plan_tools(tool_template, messages, TOOLS, {"type": "function", "function": {"name": "add"}})
    assert tool_template.decode(named.prefix) == '<tool_call>\n{"name": "add", "arguments":'
    assert named.names == {"add"}
    # the forced tokens are the ones the template's own rendering of a call has there
    rendered = tool_template.render(
        [*messages, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]}],
        tools=TOOLS, generation_prompt=False,
    )
    start = tool_template.render(messages, tools=TOOLS)
    assert rendered[: len(start) + len(named.prefix)] == start + named.prefix
    assert plan_tools(tool_template, messages, None, None).parse is False


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
        plan_tools(tool_template, [{"role": "user", "content": "hi"}], tools, choice)
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
