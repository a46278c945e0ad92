"""Which role pre-positioning expects next: an agent loop keeps sending tool results."""

from __future__ import annotations

from headstart.idle.prepos import next_role


def test_after_a_tool_call_or_a_tool_result_the_next_message_is_a_tool_result() -> None:
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}
    assert next_role([{"role": "user", "content": "task"}, call]) == "tool"
    loop = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "{...}"},
            {"role": "tool", "content": "result"}, {"role": "assistant", "content": "{...}"}]
    assert next_role(loop) == "tool"


def test_a_chat_expects_the_user() -> None:
    assert next_role([]) == "user"
    assert next_role([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) == "user"
