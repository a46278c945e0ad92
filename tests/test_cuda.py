"""The same exactness and the TTFT comparison on CUDA, when a GPU is present."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from headstart.engine.engine import Engine
from headstart.model import HFBackend, load
from tests.helpers import QUESTIONS, cold, converse

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture(scope="module")
def gpu() -> HFBackend:
    return load(device="cuda")


def test_exact_on_cuda(gpu: HFBackend, make_engine: Callable[..., Engine]) -> None:
    assert gpu.info.device.startswith("cuda")
    engine = make_engine(gpu, gate=False)
    outs, prompts = converse(engine, "cuda", QUESTIONS)
    for c, prompt in zip(outs, prompts, strict=True):
        assert c.token_ids == cold(engine, prompt).token_ids


def test_session_turn_five_starts_sooner_than_cold_on_cuda(gpu: HFBackend, make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(gpu, gate=False)
    converse(engine, "warmup", QUESTIONS[:1])
    outs, prompts = converse(engine, "ttft", QUESTIONS)
    reference = [cold(engine, prompts[-1]) for _ in range(3)]
    assert outs[-1].ttft_ms < min(c.ttft_ms for c in reference)
