"""Benchmark workloads: determined by the seed, the right sizes, and a stream rule that holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from headstart.bench.workloads import (
    GAP_PRESETS,
    WORKLOADS,
    GapSpec,
    load_trace,
    make_workload,
    parse_gaps,
)
from headstart.model.loader import local_folder, resolve
from headstart.session.template import ChatTemplate


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate(AutoTokenizer.from_pretrained(local_folder(resolve(None))))


@pytest.mark.parametrize("name", WORKLOADS)
def test_the_same_seed_gives_the_same_workload_and_another_seed_another(name: str) -> None:
    a, b, c = make_workload(name, seed=3), make_workload(name, seed=3), make_workload(name, seed=4)
    assert a == b
    assert [s.steps for s in a.sessions] != [s.steps for s in c.sessions]


@pytest.mark.parametrize("name", WORKLOADS)
def test_the_gap_setting_changes_the_gaps_and_nothing_else(name: str) -> None:
    long, short = make_workload(name, gaps="long"), make_workload(name, gaps="short")
    for sl, ss in zip(long.sessions, short.sessions, strict=True):
        assert [st.messages for st in sl.steps] == [st.messages for st in ss.steps]
        assert all(2.0 <= st.gap_s <= 5.0 for st in sl.steps)
        assert all(0.05 <= st.gap_s <= 0.3 for st in ss.steps)
    assert long.gaps.settle and not short.gaps.settle


def test_agent_sessions_have_eight_turns_and_grow_past_a_thousand_tokens(template: ChatTemplate) -> None:
    w = make_workload("agent")
    assert len(w.sessions) >= 2
    for s in w.sessions:
        assert len(s.steps) >= 9  # the task, then at least 8 (answer, tool result) turns
        assert [st.messages[0]["role"] for st in s.steps] == ["user"] + ["tool"] * (len(s.steps) - 1)
        messages = [{"role": "system", "content": s.system}]
        for st in s.steps[:8]:
            messages += list(st.messages)
            messages.append({"role": "assistant", "content": "{}"})  # answers only add to this
        assert len(template.render(messages)) > 1000


def test_stream_answers_follow_the_rule_and_questions_come_with_and_without_new_data() -> None:
    w = make_workload("stream")
    kinds = set()
    for s in w.sessions:
        limit = float(re.search(r"above ([\d.]+) C", s.query).group(1))
        seen: list[float] = []
        for st in s.steps:
            kinds.add(st.kind)
            assert st.fast_answer == ("Yes", "No")
            assert st.messages[-1]["content"] == s.query
            for m in st.messages[:-1]:
                seen.append(float(re.search(r"inlet=([\d.]+)C", m["content"]).group(1)))
            assert st.truth == ("Yes" if seen[-1] > limit else "No")
    assert kinds == {"question", "question+data"}
    truths = {st.truth for s in w.sessions for st in s.steps}
    assert truths == {"Yes", "No"}


def test_quick_is_smaller_than_full() -> None:
    for name in WORKLOADS:
        assert make_workload(name, quick=True).requests < make_workload(name).requests


def test_gap_specs_parse_and_bad_ones_are_refused() -> None:
    assert parse_gaps("long") == GAP_PRESETS["long"]
    assert parse_gaps("short-settle") == GAP_PRESETS["short"]
    assert parse_gaps("fixed:1.5") == GapSpec("fixed", 1.5, 0.0, settle=False)
    assert parse_gaps("uniform:1:2+settle") == GapSpec("uniform", 1.0, 2.0, settle=True)
    for bad in ("nope", "uniform:1", "fixed:x", "exp:-1"):
        with pytest.raises(ValueError):
            parse_gaps(bad)


def test_a_workload_survives_a_trace_round_trip(tmp_path: Path) -> None:
    w = make_workload("stream", quick=True)
    path = tmp_path / "trace.jsonl"
    w.to_jsonl(path)
    back = load_trace(path, w.gaps)
    assert back.sessions == w.sessions
    assert back.name == "stream"
    path.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="not a session line"):
        load_trace(path)


def test_agent_with_real_tools_sends_tools_instead_of_schemas_in_the_prompt(tmp_path) -> None:
    from headstart.bench.workloads import TOOL_CALL_TOKENS, load_trace, make_workload

    plain = make_workload("agent", quick=True)
    real = make_workload("agent", quick=True, real_tools=True)
    assert all(s.tools is None and "JSON schema" in s.system for s in plain.sessions)
    for s in real.sessions:
        assert s.tools and all(t["type"] == "function" and t["function"]["name"] for t in s.tools)
        assert "JSON schema" not in s.system
        assert all(step.max_tokens >= TOOL_CALL_TOKENS for step in s.steps)
    # the same content otherwise: only how the tools travel differs
    assert [st.messages for st in plain.sessions[0].steps] == [st.messages for st in real.sessions[0].steps]
    real.to_jsonl(tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl").sessions[0].tools == real.sessions[0].tools


def test_tool_results_answer_the_calls_the_model_made() -> None:
    from headstart.bench.runner import answered, reply
    from headstart.engine.output import Completion
    from headstart.session.tools import ToolCall

    call = ToolCall("read_file", {"path": "x.py"}, id="call_abc")
    c = Completion(text="", token_ids=[1], finish_reason="tool_calls", path="cold", session_id=None,
                   prompt_tokens=1, cached_tokens=0, ttft_ms=1, decided_ms=1, e2e_ms=1, foreground_wait_ms=0,
                   tool_calls=[call])
    message = reply(c)
    assert message["tool_calls"][0]["id"] == "call_abc"
    step = ({"role": "tool", "tool_call_id": "call_0", "content": "ok"},)
    assert answered(step, ["call_abc"])[0]["tool_call_id"] == "call_abc"
    assert answered(step, [])[0]["tool_call_id"] == "call_0"
