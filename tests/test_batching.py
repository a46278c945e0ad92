"""Continuous batching on the real default model: sessions computed in the same steps
answer exactly what each computes alone (greedy, and sampled with a seed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, Request
from headstart.model import HFBackend
from tests.helpers import QUESTIONS, cold

GREEDY = SamplingParams(max_tokens=16)


def _steps_since(engine: Engine, mark: int) -> list[tuple[int, int]]:
    """(tokens, sequences) of each step after the first ``mark``."""
    stats = engine.stats
    with stats.lock:
        return list(zip(list(stats.step_tokens), list(stats.step_sequences), strict=True))[mark:]


def _mark(engine: Engine) -> int:
    with engine.stats.lock:
        return len(engine.stats.step_tokens)


@pytest.mark.parametrize("linear", ["onednn", "fp16"])  # fp32 weights, and the opt-in fp16 ones
def test_concurrent_sessions_each_answer_as_alone(
    real: HFBackend, make_engine: Callable[..., Engine], linear: str
) -> None:
    engine = make_engine(real, pre_position=False, gate=False, linear=linear)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    mark = _mark(engine)
    handles = [engine.submit(Request(messages=m, params=GREEDY, session_id=f"c{i}")) for i, m in enumerate(prompts)]
    together = [h.result() for h in handles]
    steps = _steps_since(engine, mark)
    assert max(seqs for _, seqs in steps) >= 4, "the sessions should have shared steps"
    for m, c in zip(prompts, together, strict=True):
        assert c.token_ids == cold(engine, m, params=GREEDY).token_ids
    # a second turn of every session, again all at once, on their kept KV
    follow = [[*m, {"role": "assistant", "content": c.text}, {"role": "user", "content": QUESTIONS[-1]}]
              for m, c in zip(prompts, together, strict=True)]
    handles = [engine.submit(Request(messages=m, params=GREEDY, session_id=f"c{i}")) for i, m in enumerate(follow)]
    again = [h.result() for h in handles]
    assert all(c.path == "session" and c.cached_tokens > 0 for c in again)
    for m, c in zip(follow, again, strict=True):
        assert c.token_ids == cold(engine, m, params=GREEDY).token_ids


def test_long_cold_prefill_beside_decodes_is_chunked_and_exact(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, pre_position=False, gate=False, step_tokens=64)
    short = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    story = " ".join(f"Line {i}: the river flows past the old mill and the bridge." for i in range(80))
    long = [{"role": "user", "content": f"{story}\nWhat flows past the mill?"}]
    assert len(engine.template.render(long)) > 1000
    mark = _mark(engine)
    handles = [engine.submit(Request(messages=m, params=SamplingParams(max_tokens=40), session_id=f"d{i}"))
               for i, m in enumerate(short)]
    big = engine.submit(Request(messages=long, params=GREEDY, session_id="long"))
    decoded = [h.result() for h in handles]
    answer = big.result()
    steps = _steps_since(engine, mark)
    # the long prompt ran in chunks that shared their step with the others' decode tokens
    assert any(seqs > 1 and tokens > seqs for tokens, seqs in steps), steps
    assert max(tokens for tokens, _ in steps) <= 64 + len(short)
    assert answer.extra["forwards_before_first_token"] > 1  # its own prefill chunks
    assert answer.token_ids == cold(engine, long, params=GREEDY).token_ids
    for m, c in zip(short, decoded, strict=True):
        assert c.token_ids == cold(engine, m, params=SamplingParams(max_tokens=40)).token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(
    real: HFBackend, make_engine: Callable[..., Engine]
) -> None:
    engine = make_engine(real, pre_position=False, gate=False)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=11 + i) for i in range(4)]
    alone = [cold(engine, m, params=p).token_ids for m, p in zip(prompts, params, strict=True)]
    mark = _mark(engine)
    handles = [engine.submit(Request(messages=m, params=p)) for m, p in zip(prompts, params, strict=True)]
    together = [h.result().token_ids for h in handles]
    assert max(seqs for _, seqs in _steps_since(engine, mark)) >= 3
    assert together == alone
