"""The logits rules against a plain reference written from vLLM's definitions, over random
logits: penalties, bias, min-p, top-k, log-probabilities."""

from __future__ import annotations

import math
import random

import pytest
import torch

from headstart.decode.logits import Chooser
from headstart.decode.sampling import SamplingParams, argmax, distribution, top_gap

VOCAB = 64


def reference(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams) -> list[float]:
    """vLLM: bias, then repetition (prompt and output), frequency and presence (output)."""
    out = list(logits)
    for token, bias in p.logit_bias:
        out[token] += bias
    for token in set(prompt) | set(output):
        out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
    for token in set(output):
        out[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    return out


@pytest.mark.parametrize("seed", range(12))
def test_greedy_choices_follow_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    params = SamplingParams(
        presence_penalty=rng.uniform(-2, 2),
        frequency_penalty=rng.uniform(-2, 2),
        repetition_penalty=rng.uniform(0.5, 2.0),
        logit_bias=tuple(sorted((t, rng.uniform(-100, 100)) for t in rng.sample(range(VOCAB), 3))),
        logprobs=True,
        top_logprobs=5,
    )
    prompt = [rng.randrange(VOCAB) for _ in range(10)]
    chooser = Chooser(params, prompt, VOCAB, "cpu", None)
    output: list[int] = []
    torch.manual_seed(seed)
    for _ in range(30):
        # Peaked logits that favour repeating earlier tokens, so the penalties matter.
        logits = torch.randn(VOCAB) * 3
        logits[prompt[:3]] += 6
        shaped = reference(logits.tolist(), prompt, output, params)
        expected = max(range(VOCAB), key=shaped.__getitem__)
        token = chooser.choose(logits)
        assert token == expected
        logp = torch.log_softmax(logits, -1)
        assert chooser.last is not None and chooser.last.token == token
        assert math.isclose(chooser.last.logprob, float(logp[token]), abs_tol=1e-5)  # the model's own
        assert [t for t, _ in chooser.last.top] == torch.topk(logp, 5).indices.tolist()
        output.append(token)


def test_the_greedy_argmax_is_torchs_first_largest_logit() -> None:
    """The CPU scan that picks every greedy token (numpy's, on the calling thread) picks
    what torch.argmax picks: the first of tied maxima, a NaN over any number, through a
    -inf mask, on a strided row; a half-precision tensor takes torch's own."""
    torch.manual_seed(0)
    rows = [torch.randn(49152) for _ in range(20)]
    tied = torch.zeros(VOCAB)
    tied[[7, 3, 40]] = 2.0
    nan = torch.randn(VOCAB)
    nan[[9, 30]] = float("nan")
    masked = torch.full((VOCAB,), float("-inf"))
    masked[[50, 12]] = -3.0
    strided = torch.randn(4, VOCAB).t()[5]
    for logits in [*rows, tied, nan, masked, strided, torch.zeros(VOCAB), torch.randn(VOCAB).half()]:
        assert argmax(logits) == int(torch.argmax(logits))
    assert argmax(tied) == 3 and argmax(nan) == 9 and argmax(masked) == 12


def test_the_gap_scan_finds_the_greedy_token_and_topks_gap() -> None:
    """top_gap's token is the greedy pick of the same logits (a ready position's token is
    its first token) and its gap topk's: on ties, through a mask, with a NaN."""
    torch.manual_seed(1)
    tied = torch.zeros(VOCAB)
    tied[[63, 7]] = 2.0  # topk's index here is 63, the greedy pick's 7
    masked = torch.full((VOCAB,), float("-inf"))
    masked[[50, 12]] = -3.0
    lone = torch.full((VOCAB,), float("-inf"))
    lone[9] = 1.0
    for logits in [*(torch.randn(49152) for _ in range(20)), tied, masked, lone, torch.randn(VOCAB).half()]:
        values = torch.topk(logits, 2).values
        assert top_gap(logits) == (int(torch.argmax(logits)), float(values[0] - values[1]))
    nan = torch.randn(VOCAB)
    nan[[30, 9]] = float("nan")
    token, gap = top_gap(nan)
    assert token == 9 and math.isnan(gap)


def test_a_known_argmax_stands_only_for_a_greedy_choice_under_no_rule() -> None:
    """A ready position's token saves the first token's scan only where the scan would find
    it: with a bias or a draw the rules choose, as they would on any logits."""
    logits = torch.zeros(VOCAB)
    logits[5], logits[6] = 3.0, 2.0
    assert Chooser(SamplingParams(), [], VOCAB, "cpu", None).choose(logits, argmax=5) == 5
    biased = Chooser(SamplingParams(logit_bias=((6, 5.0),)), [], VOCAB, "cpu", None)
    assert biased.choose(logits, argmax=5) == 6
    drawn = Chooser(SamplingParams(temperature=1.0, top_k=1), [], VOCAB, "cpu", torch.Generator().manual_seed(0))
    logits[6] = 9.0  # the scan the caller did was of other logits: a draw must not take its word
    assert drawn.choose(logits, argmax=5) == 6


def test_the_rules_change_the_choice() -> None:
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0])
    assert Chooser(SamplingParams(), [], 4, "cpu", None).choose(logits) == 0
    assert Chooser(SamplingParams(logit_bias=((0, -100.0),)), [], 4, "cpu", None).choose(logits) == 1
    assert Chooser(SamplingParams(repetition_penalty=1.5), [0], 4, "cpu", None).choose(logits) == 1  # 5/1.5 < 4
    c = Chooser(SamplingParams(frequency_penalty=0.6), [], 4, "cpu", None)
    assert [c.choose(logits) for _ in range(3)] == [0, 0, 1]  # 5 - 0.6 > 4, then 5 - 2 * 0.6 < 4


def test_a_snapshot_judges_later_logits_under_the_earlier_rules() -> None:
    c = Chooser(SamplingParams(presence_penalty=2.0), [], 4, "cpu", None)
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0])
    assert c.choose(logits) == 0
    rules = c.last_step
    assert c.choose(logits) == 1  # 0 is now penalised
    assert rules is not None and torch.equal(rules.apply(logits), logits)  # the first step's rules: none yet


def test_min_p_and_top_k_narrow_the_draw() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = distribution(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = distribution(logits, SamplingParams(temperature=1.0, min_p=0.25))  # keeps p >= 0.125
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
