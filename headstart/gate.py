"""The confidence gate: when may a request be answered from a cached distribution.

The signal is the logit gap (top-1 minus top-2) at the ready position, over the whole
vocabulary or over the first tokens of a candidate list. Every answer the gate gives is
verified after the fact against the real computation; the (gap, verified) pairs feed
both the live precision figures and calibration.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

DEFAULT_THRESHOLD = 2.0


@dataclass
class GateCounters:
    """Live accounting of the gate; ``precision`` is over verified answers only."""

    fires: int = 0
    verified: int = 0
    false_accepts: int = 0
    declined: int = 0

    @property
    def precision(self) -> float | None:
        checked = self.verified + self.false_accepts
        return self.verified / checked if checked else None


@dataclass(frozen=True)
class CalibrationPoint:
    threshold: float
    coverage: float
    precision: float | None
    fired: int


@dataclass(frozen=True)
class Calibration:
    """A threshold that reaches ``target`` precision, what it leaves, and what it rests on."""

    target: float
    threshold: float | None
    coverage: float
    precision: float | None
    fired: int
    samples: int
    curve: list[CalibrationPoint]


def calibrate(pairs: list[tuple[float, bool]], target: float = 0.95) -> Calibration:
    """The lowest threshold whose fired answers reach ``target`` precision.

    ``pairs`` are (gap, first token verified) for requests that had a ready position and
    a prompt that differed from it. Each candidate threshold is a gap seen in the data;
    the curve lists them all so a reader sees the trade-off, not one point.
    """
    n = len(pairs)
    ordered = sorted(pairs, key=lambda p: -p[0])
    curve: list[CalibrationPoint] = []
    ok = 0
    for i, (gap, good) in enumerate(ordered, start=1):
        ok += good
        if i < n and ordered[i][0] == gap:
            continue  # a threshold admits every pair with an equal gap
        curve.append(CalibrationPoint(gap, i / n, ok / i, i))
    curve.reverse()  # ascending thresholds
    passing = [p for p in curve if p.precision is not None and p.precision >= target]
    if not passing:
        return Calibration(target, None, 0.0, None, 0, n, curve)
    best = passing[0]
    return Calibration(target, best.threshold, best.coverage, best.precision, best.fired, n, curve)


@dataclass
class Gate:
    """Server-wide gate settings and the record of its decisions (the threshold comes from
    EngineConfig, whose default is DEFAULT_THRESHOLD)."""

    threshold: float
    enabled: bool = True
    counters: GateCounters = field(default_factory=GateCounters)
    history: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=10_000))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fires(self, gap: float, threshold: float | None = None) -> bool:
        limit = self.threshold if threshold is None else threshold
        return not math.isnan(gap) and gap >= limit

    def record(self, gap: float, verified: bool, fired: bool) -> None:
        """Keep one (gap, verified) pair; count it if the gate actually answered."""
        with self._lock:
            self.history.append((gap, verified))
            if fired:
                self.counters.fires += 1
                if verified:
                    self.counters.verified += 1
                else:
                    self.counters.false_accepts += 1

    def decline(self) -> None:
        with self._lock:
            self.counters.declined += 1

    def pairs(self) -> list[tuple[float, bool]]:
        with self._lock:
            return list(self.history)
