"""A failure part-way through an ingest batch (a forward, the tokenizer) loses none of the
pushes the client was told succeeded: the batch stays in flight, is taken up again, joins
the transcript once, and the KV and every later answer agree with a cold computation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.engine.sessions import measure, push
from headstart.model import HFBackend
from tests.helpers import cold

SYSTEM = "You log a temperature sensor. Answer with the reading only."
READINGS = [f"09:{i:02d} temperature {17 + i % 9} C" for i in range(12)]


def _fail_once(target: Any, name: str, when: int) -> list[int]:
    """Make ``target.name`` raise on its ``when``-th call from now (once); the calls seen."""
    original = getattr(target, name)
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == when:
            raise RuntimeError(f"injected failure of {name}")
        return original(*args, **kwargs)

    setattr(target, name, flaky)
    return calls


@pytest.mark.parametrize("where", ["forward", "tokenizer"])
def test_a_failure_part_way_through_an_ingest_batch_keeps_every_acknowledged_push(
    tiny: HFBackend, make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    engine = make_engine(tiny, pre_position=False, background_chunk=16)
    s = engine.create_session("feed")
    s.messages = [{"role": "system", "content": SYSTEM}]
    if where == "forward":  # the batch's third chunk: some of its rows are in the KV already
        calls = _fail_once(engine.runner, "forward", 3)
    else:  # rendering the batch on the model thread (the door measured the entries already)
        entries = measure(engine, s, READINGS)
        calls = _fail_once(engine.template, "encode_chat", 1)
    errors = engine.stats.errors
    result = push(engine, s, entries if where == "tokenizer" else measure(engine, s, READINGS))
    assert (result.pushed, result.dropped, result.pending) == (12, 0, 12)  # what the client is told
    assert engine.wait_idle(300)
    monkeypatch.undo()
    assert s.messages == [s.messages[0], {"role": "user", "content": "\n".join(READINGS)}]  # once, whole
    counters = s.data.counters()
    assert (counters["data_version"], counters["ingested"], counters["pending"], counters["dropped"]) == (1, 12, 0, 0)
    assert len(calls) > 3 and engine.stats.errors == errors + 1  # it failed once, then went on
    assert s.kv_ids == engine.template.entry(s.messages, "user")  # the KV is the transcript's
    messages = [*s.messages, {"role": "user", "content": "What is the most recent reading?"}]
    params = SamplingParams(max_tokens=8)
    answer = engine.generate(Request(messages=messages, params=params, session_id="feed"))
    assert answer.path == "entry" and answer.token_ids == cold(engine, messages, params).token_ids
