"""Logits processing: every rule a request sets on how its next token is chosen, in one place.

Whatever the path (a decode step, a ready position's real distribution, the gate's cached
one, a sure-tail draft being verified), the engine asks one :class:`Chooser` for the token,
so logit bias, the penalties, a grammar's mask, the draw and the log-probabilities are the
same everywhere. A first token taken from a cached distribution is therefore chosen under
exactly the rules a cold computation applies.

Order and semantics follow vLLM's sampler: logit bias, then the penalties (repetition on
prompt and output tokens: a positive logit divided by the penalty, a negative one
multiplied; frequency: minus the penalty times the token's count in the output; presence:
minus the penalty once the token occurs in the output), then the grammar's mask, then
temperature, min-p, top-k and top-p for the draw (sampling.py). Log-probabilities are the
model's own, ``log_softmax`` of the raw logits (vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from headstart.decode.sampling import SamplingParams, pick


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and its most likely alternatives; ``cached`` when
    the distribution was a ready position's, computed before the request came."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    cached: bool = False


class Matcher(Protocol):
    """A grammar's state over the tokens chosen so far (grammar.py)."""

    def forbidden(self, vocab: int) -> torch.Tensor:
        """A boolean vector over the vocabulary: True where the grammar forbids the token next."""

    def accept(self, token: int) -> None:
        """Move past ``token`` (one the mask allowed)."""


class Step:
    """The rules in force at one position, applicable to any logits for that position: the
    gate judges and verifies its cached and real distributions under the same rules."""

    def __init__(self, chooser: Chooser) -> None:
        self._c = chooser
        self._counts = chooser.counts.clone() if chooser.counts is not None else None
        self._seen = chooser.seen.clone() if chooser.seen is not None else None
        self._forbidden = chooser.matcher.forbidden(chooser.vocab) if chooser.matcher is not None else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        c, p = self._c, self._c.params
        out = fresh(logits)
        if c.bias is not None:
            out += c.bias
        if self._seen is not None:
            scaled = torch.where(out > 0, out / p.repetition_penalty, out * p.repetition_penalty)
            out = torch.where(self._seen, scaled, out)
        if self._counts is not None:
            out -= p.frequency_penalty * self._counts + p.presence_penalty * (self._counts > 0)
        if self._forbidden is not None:
            out = masked(out, self._forbidden)
        return out


def fresh(logits: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``logits`` to reshape. On the CPU numpy copies on the calling thread:
    a torch op over the vocabulary is split across the intra-op threads and waits for the last
    of them, which a loaded CPU may not schedule for milliseconds (what that cost a grammar's
    mask: README, "Structured outputs")."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.detach().numpy().copy())
    return logits.float().clone()


def masked(logits: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """``logits`` with -inf where ``forbidden`` (a CPU mask), in place; on the CPU by numpy,
    on the calling thread, for the reason ``fresh`` gives."""
    if logits.device.type == "cpu":
        np.copyto(logits.numpy(), -np.inf, where=forbidden.numpy())
        return logits
    return logits.masked_fill_(forbidden.to(logits.device), float("-inf"))


class Chooser:
    """One request's token choices: the rules, their state (output counts, grammar), the draw."""

    def __init__(
        self,
        params: SamplingParams,
        prompt: Sequence[int],
        vocab: int,
        device: torch.device | str,
        generator: torch.Generator | None,
        matcher: Matcher | None = None,
    ) -> None:
        self.params = params
        self.vocab = vocab
        self.generator = generator
        self.matcher = matcher
        self.bias: torch.Tensor | None = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            ids = torch.tensor([i for i, _ in params.logit_bias], device=device)
            self.bias[ids] = torch.tensor([b for _, b in params.logit_bias], device=device)
        self.counts = (
            torch.zeros(vocab, device=device) if params.frequency_penalty or params.presence_penalty else None
        )
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        self.last: TokenLogprob | None = None
        self.last_step: Step | None = None

    @property
    def active(self) -> bool:
        """Whether the logits are reshaped before the draw (else the raw ones are drawn from)."""
        return self.params.reshapes

    def step(self) -> Step:
        """The rules at the next position."""
        return Step(self)

    def choose(self, logits: torch.Tensor, *, cached: bool = False, argmax: int | None = None) -> int:
        """The next token from ``logits`` under every rule; the state moves past it.
        ``argmax``: the logits' argmax, when it is known already (a ready position's, found
        in idle time by the same scan): a greedy choice under no rule is that token, and
        the vocabulary is not scanned again."""
        step = self.step()
        shaped = step.apply(logits) if self.active else logits
        if argmax is not None and self.params.greedy and not self.active:
            token = argmax
        else:
            token = pick(shaped, self.params, self.generator)
        self.last_step = step
        self.last = self.logprob(logits, token, cached) if self.params.logprobs else None
        self._advance(token)
        return token

    def logprob(self, logits: torch.Tensor, token: int, cached: bool = False) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.top_logprobs:
            values, indices = torch.topk(logp, self.params.top_logprobs)
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token, float(logp[token]), top, cached)

    def _advance(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.matcher is not None:
            self.matcher.accept(token)
