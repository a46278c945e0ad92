"""Conversation drivers shared by tests."""

from __future__ import annotations

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.engine.output import Completion
from headstart.session.session import Session

GREEDY = SamplingParams(max_tokens=16)

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "And what is the capital of Germany?",
    "Name one famous river in that country.",
    "How long is it, roughly?",
    "Thank you! Summarise our chat in one line.",
]


def converse(
    engine: Engine,
    session_id: str,
    questions: list[str],
    params: SamplingParams = GREEDY,
    idle: bool = True,
    **fields: object,
) -> tuple[list[Completion], list[list[dict[str, str]]]]:
    """Run ``questions`` as turns of one session; return completions and each turn's prompt."""
    messages: list[dict[str, str]] = []
    outs, prompts = [], []
    for q in questions:
        messages.append({"role": "user", "content": q})
        prompts.append(list(messages))
        c = engine.generate(Request(messages=list(messages), params=params, session_id=session_id, **fields))
        outs.append(c)
        messages.append({"role": "assistant", "content": c.text})
        if idle:
            assert engine.wait_idle(300)
    return outs, prompts


def hint_next(engine: Engine, session_id: str, hint: str) -> Session:
    """The client names its next message (the session's hint), and pre-positioning parks a
    ready position for it; returns the session."""
    session = engine.get_session(session_id)
    session.settings.hint = hint
    engine.schedule_pre_position(session)
    assert engine.wait_idle(300)
    assert session.ready["next"].source == "hint"
    return session


def hinted_turn(
    engine: Engine, session_id: str, prompt: list[dict[str, str]], answer: str, question: str,
    params: SamplingParams = GREEDY,
) -> tuple[list[dict[str, str]], Completion]:
    """The turn that sends the message the session was hinted (:func:`hint_next`). Returns its
    messages and its completion."""
    hint_next(engine, session_id, question)
    messages = [*prompt, {"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return messages, engine.generate(Request(messages=messages, params=params, session_id=session_id))


def cold(
    engine: Engine, messages: list[dict[str, str]], params: SamplingParams = GREEDY, **fields: object
) -> Completion:
    """The same prompt computed from scratch (a one-off request, no session)."""
    return engine.generate(Request(messages=messages, params=params, **fields))


def greedy_after(engine: Engine, messages: list[dict[str, str]], first: int, max_tokens: int) -> list[int]:
    """The greedy answer to ``messages`` that starts with ``first``, computed directly on the
    backend (one prefill, then one token at a time; not the engine's decode loop)."""
    backend = engine.backend
    stop = {*backend.info.eos_token_ids, engine.template.end_of_message}
    if first in stop:
        return []
    state = backend.new_state()
    tokens = [first]
    logits = backend.forward(state, [*engine.template.render(messages), first])[-1]
    while len(tokens) < max_tokens:
        token = int(logits.argmax())
        if token in stop:
            break
        tokens.append(token)
        logits = backend.forward(state, [token])[-1]
    return tokens
