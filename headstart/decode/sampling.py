"""The vocabulary scan: choose a token from one position's logits.

Logits stay on the model's device as a tensor; a choice is one reduction over the
vocabulary, never a copy into Python lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy.

    The penalties, bias and ``constraint`` reshape the logits before the draw (see
    logits.py, which applies them, with vLLM's semantics); ``top_k`` and ``min_p`` narrow
    the draw itself; ``logprobs`` / ``top_logprobs`` ask for the model's log-probabilities
    of each chosen token and of its ``top_logprobs`` most likely alternatives.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    top_k: int = 0  # 0: the whole vocabulary
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None

    @property
    def reshapes(self) -> bool:
        """Whether anything but the draw itself changes the logits (see logits.py)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
            or self.constraint is not None
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A per-request generator, seeded when the client gave a seed."""
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


@dataclass(frozen=True)
class Constraint:
    """What the output must parse as: any JSON object, JSON valid under ``schema`` (a JSON
    Schema document), or tool calls (``schema``: an xgrammar structural tag, see tools.py);
    the schema as text so the parameters stay hashable."""

    kind: str  # "json_object" | "json_schema" | "tool_calls"
    schema: str | None = None


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities a sampled request draws from: temperature, then min-p, top-k and
    the nucleus, in vLLM's order."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.min_p > 0.0:
        probs = torch.where(probs < params.min_p * probs.max(), 0.0, probs)
    if 0 < params.top_k < probs.numel():
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if params.min_p > 0.0 or params.top_k > 0:
        probs /= probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs /= probs.sum()
    return probs


def _as_numpy(logits: torch.Tensor) -> np.ndarray | None:
    """``logits`` as a flat numpy view where numpy can scan them (CPU float32), else None.
    numpy scans on the calling thread: torch's argmax over a 49k vocabulary takes ~120 us
    here and its topk ~160 us, against numpy's ~12, on every greedy token chosen."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return logits.numpy().reshape(-1)
    return None


def argmax(logits: torch.Tensor) -> int:
    """The index of the first largest logit (a NaN counts as largest), as ``torch.argmax``
    gives it."""
    v = _as_numpy(logits)
    return int(np.argmax(v)) if v is not None else int(torch.argmax(logits))


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits``: argmax when greedy, else a draw."""
    if params.greedy:
        return argmax(logits)
    probs = distribution(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator))


def accept(
    target: torch.Tensor,
    draft: torch.Tensor,
    token: int,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> bool:
    """Whether ``token`` drawn from ``draft`` logits stands under ``target`` logits.

    Greedy: both argmaxes agree. Sampled: speculative sampling's ``min(1, p/q)`` test.
    """
    if params.greedy:
        return argmax(target) == token
    p = float(distribution(target, params)[token])
    q = float(distribution(draft, params)[token])
    if q <= 0.0:
        return False
    u = float(torch.rand((), generator=generator, device=target.device))
    return u < min(1.0, p / q)


def top_gap(logits: torch.Tensor) -> tuple[int, float]:
    """The argmax (as :func:`argmax` gives it, ties and all: a greedy pick of these logits
    is this token) and the logit gap top-1 minus top-2: the gate's confidence signal."""
    v = _as_numpy(logits)
    if v is not None:
        i = int(np.argmax(v))
        second = max(v[:i].max(initial=-np.inf), v[i + 1 :].max(initial=-np.inf))  # a NaN anywhere is v[i]
        return i, float(v[i] - np.float32(second))
    values = torch.topk(logits, 2).values
    return argmax(logits), float(values[0] - values[1])


def candidate_gap(logits: torch.Tensor, first_ids: torch.Tensor) -> tuple[int, float]:
    """Index of the best candidate by its first token's logit, and its gap to the runner-up.

    Candidates that share a first token cannot be told apart by one scan: the gap is 0.
    """
    scores = logits[first_ids]
    if scores.numel() == 1:
        return 0, float("inf")
    values, indices = torch.topk(scores, 2)
    best, second = int(indices[0]), int(indices[1])
    if int(first_ids[best]) == int(first_ids[second]):
        return best, 0.0
    return best, float(values[0] - values[1])
