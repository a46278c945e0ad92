"""Any other architecture runs on the pool through transformers, and stays exact."""

from __future__ import annotations

from collections.abc import Callable

import torch

from headstart.engine.engine import Engine
from headstart.kv import KVSeq
from headstart.model import HFBackend
from headstart.model.hf_runner import HFRunner
from headstart.model.runner import Feed, from_backend
from tests.helpers import QUESTIONS, cold, converse


def test_the_fallback_equals_transformers_on_its_own_cache(mistral: HFBackend) -> None:
    runner = from_backend(mistral, kv_budget=1024 * mistral.info.kv_bytes_per_token, block_size=4)
    assert isinstance(runner, HFRunner)
    ids = list(range(200, 230))
    state = mistral.new_state()
    want = [mistral.forward(state, ids[:13]), mistral.forward(state, ids[13:])]
    seq = KVSeq(runner.pool)
    got = [runner.forward([Feed(seq, ids[:13])])[0], runner.forward([Feed(seq, ids[13:])])[0]]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    fork = seq.fork()
    assert torch.equal(runner.forward([Feed(fork, [7])])[0], mistral.forward(state, [7]))


def test_sessions_on_the_fallback_equal_cold(mistral: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(mistral, gate=False)
    outs, prompts = converse(engine, "m", QUESTIONS[:3])
    assert [c.path for c in outs][1:] != ["cold", "cold"]
    for c, prompt in zip(outs, prompts, strict=True):
        assert c.token_ids == cold(engine, prompt).token_ids
