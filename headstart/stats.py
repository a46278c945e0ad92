"""What the engine did, for the metrics door, the benchmark and the tests.

Plain counters and bounded sample windows behind one lock; readers take a snapshot.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

PATHS = ("ready_exact", "gate", "entry", "session", "prefix", "cold")
WINDOW = 10_000


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no data (never a made-up zero)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary(values: list[float]) -> dict[str, float | None]:
    mean = sum(values) / len(values) if values else None
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": mean,
        "n": len(values),
    }


@dataclass
class BackgroundTokens:
    computed: int = 0
    reused: int = 0
    wasted: int = 0


@dataclass
class StreamStats:
    """Counters of the sessions API's background work: data, registered questions, warms."""

    pushed: int = 0
    dropped: int = 0
    ingested: int = 0
    query_evaluations: int = 0
    warmed: int = 0
    warm_covered: int = 0
    warm_cancelled: int = 0
    warmed_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


@dataclass
class EngineStats:
    """Counters the engine updates from its model thread."""

    requests: Counter[str] = field(default_factory=Counter)
    ttft_ms: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(lambda: deque(maxlen=WINDOW)))
    e2e_ms: dict[str, deque[float]] = field(default_factory=lambda: defaultdict(lambda: deque(maxlen=WINDOW)))
    # How long requests waited behind a background chunk before their first step.
    background_wait_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    background: BackgroundTokens = field(default_factory=BackgroundTokens)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    forward_calls: int = 0
    errors: int = 0
    # Per step of the step loop: its duration, the tokens and sequences its forward held,
    # the background tokens among them and their share of the step budget.
    step_ms: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    step_tokens: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    step_sequences: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    step_background: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    step_background_share: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    steps: int = 0
    steps_tokens_total: int = 0
    steps_background_total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_request(
        self, path: str, ttft_ms: float, e2e_ms: float, wait_ms: float, prompt: int, cached: int, completion: int
    ) -> None:
        with self.lock:
            self.requests[path] += 1
            self.ttft_ms[path].append(ttft_ms)
            self.e2e_ms[path].append(e2e_ms)
            self.background_wait_ms.append(wait_ms)
            self.prompt_tokens += prompt
            self.cached_tokens += cached
            self.completion_tokens += completion

    def record_step(self, step: Any, budget: int) -> None:
        """One step of the loop (scheduler.Step) under a budget of ``budget`` tokens."""
        with self.lock:
            self.steps += 1
            self.steps_tokens_total += step.tokens
            self.steps_background_total += step.background
            self.step_ms.append(step.seconds * 1000)
            self.step_tokens.append(step.tokens)
            self.step_sequences.append(step.sequences)
            self.step_background.append(step.background)
            self.step_background_share.append(step.background / budget)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            total = sum(self.requests.values())
            hits = self.requests["ready_exact"] + self.requests["gate"]
            return {
                "requests": total,
                "paths": {p: self.requests[p] for p in PATHS},
                "ttft_ms": {p: summary(list(self.ttft_ms[p])) for p in PATHS if self.ttft_ms[p]},
                "e2e_ms": {p: summary(list(self.e2e_ms[p])) for p in PATHS if self.e2e_ms[p]},
                "coverage": hits / total if total else None,
                "foreground_wait_ms": summary(list(self.background_wait_ms)),
                "background_tokens": {
                    "computed": self.background.computed,
                    "reused": self.background.reused,
                    "wasted": self.background.wasted,
                },
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens,
                "forward_calls": self.forward_calls,
                "errors": self.errors,
                "steps": {
                    "n": self.steps,
                    "tokens_total": self.steps_tokens_total,
                    "background_tokens_total": self.steps_background_total,
                    "duration_ms": summary(list(self.step_ms)),
                    "tokens": summary(list(self.step_tokens)),
                    "sequences": summary(list(self.step_sequences)),
                    "max_sequences": max(self.step_sequences, default=0),
                    "background_tokens": summary(list(self.step_background)),
                    "background_budget_share": summary(list(self.step_background_share)),
                },
            }
