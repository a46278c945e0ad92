"""The confidence gate: when may a request be answered from a cached distribution.

The signal is the logit gap (top-1 minus top-2) at the ready position, over the whole
vocabulary or over the first tokens of a candidate list. Every answer the gate gives is
verified after the fact against the real computation, and every exact answer that met a
ready position records what the gate would have said (a shadow check); these
(gap, verified) pairs are the gate's evidence.

By default the gate carries a guarantee: it fires at a threshold only when the one-sided
lower Clopper-Pearson bound of the precision of the verified answers at or above that
threshold reaches the operator's target, at the operator's confidence. The evidence is kept
per calibration key (a ``fast_answer`` candidate set, a session, the server as a whole), each
in a bounded window of recent pairs, so a workload whose agreement drifts down closes the
gate again. With too little evidence the gate stays closed and says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from headstart.config import GATE_CONFIDENCE, GATE_MAX_KEYS, GATE_TARGET, GATE_WINDOW

SERVER_KEY = "server"


# -- the bound --------------------------------------------------------------------------


def _beta_cf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0.

    The continued fraction converges fast for x < (a + 1) / (a + b + 2); above it the
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) is used instead.
    """
    if not (a > 0 and b > 0):
        raise ValueError("betainc needs a > 0 and b > 0")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def beta_quantile(p: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = p, by bisection (I is increasing in x): slow but sure."""
    if not 0.0 <= p <= 1.0:
        raise ValueError("p must be in [0, 1]")
    lo, hi = 0.0, 1.0
    for _ in range(100):  # a double has 53 bits: the interval stops shrinking well before
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if betainc(a, b, mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def lower_bound(successes: int, n: int, confidence: float) -> float:
    """The one-sided lower Clopper-Pearson bound of a binomial proportion.

    The p at which P(Binomial(n, p) >= successes) = 1 - confidence, i.e. the
    (1 - confidence) quantile of Beta(successes, n - successes + 1); 0 when nothing succeeded.
    """
    if not 0 <= successes <= n:
        raise ValueError("need 0 <= successes <= n")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    if successes == 0:
        return 0.0
    return beta_quantile(1.0 - confidence, successes, n - successes + 1)


def reaches(successes: int, n: int, target: float, confidence: float) -> bool:
    """``lower_bound(successes, n, confidence) >= target``, by one evaluation of the
    incomplete beta instead of a quantile search: the bound reaches ``target`` exactly when
    P(Binomial(n, target) >= successes) = I_target(successes, n - successes + 1) is at most
    1 - confidence (the tail grows with p, and the bound is where it equals 1 - confidence)."""
    if successes == 0:
        return False
    return betainc(successes, n - successes + 1, target) <= 1.0 - confidence


def min_evidence(target: float, confidence: float) -> int:
    """The fewest verified answers on which the bound can reach ``target`` (all of them
    right: the bound is then (1 - confidence) ** (1 / n))."""
    if not 0.0 < target < 1.0:
        raise ValueError("a target precision must be in (0, 1): no finite evidence bounds it at 1")
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log(target)))
    while not reaches(n, n, target, confidence):
        n += 1
    while n > 1 and reaches(n - 1, n - 1, target, confidence):
        n -= 1
    return n


# -- calibration ------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationPoint:
    threshold: float
    coverage: float  # share of the pairs at or above the threshold
    precision: float | None
    bound: float | None
    fired: int


@dataclass(frozen=True)
class Calibration:
    """Where the gate may fire on some evidence, what it leaves, and what it rests on.

    ``threshold`` is None when the gate must stay closed; ``reason`` then says why.
    ``precision`` and ``bound`` are those at ``threshold`` (or, closed, at the most
    confident slice that had enough evidence to be tested).
    """

    target: float
    confidence: float
    threshold: float | None
    coverage: float
    precision: float | None
    bound: float | None
    fired: int
    samples: int
    reason: str | None
    curve: list[CalibrationPoint]

    @property
    def open(self) -> bool:
        return self.threshold is not None

    @property
    def enough(self) -> bool:
        """Enough evidence to decide either way (a closed gate on tested evidence also decides)."""
        return self.open or self.bound is not None

    def describe(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "threshold": self.threshold,
            "precision": self.precision,
            "bound": self.bound,
            "coverage": self.coverage,
            "fired": self.fired,
            "n": self.samples,
            "reason": self.reason,
        }


def calibrate(
    pairs: Sequence[tuple[float, bool]],
    target: float = GATE_TARGET,
    confidence: float = GATE_CONFIDENCE,
    *,
    curve_bounds: bool = False,
) -> Calibration:
    """The lowest threshold whose answers' precision has a lower bound of at least ``target``.

    Candidate thresholds are the gaps seen, tested from the most confident down (fixed-
    sequence testing): the first that fails the bound ends the descent, which keeps the
    chance of opening at a threshold whose true precision is under ``target`` within
    1 - ``confidence`` however many thresholds are looked at. Thresholds above fewer pairs
    than :func:`min_evidence` are skipped, not failed: they cannot pass whatever their
    answers, and which they are depends on the gaps alone, not on whether the answers agreed.
    Each test is one incomplete-beta evaluation (:func:`reaches`); the bound itself is
    computed for the deciding point, and for every point of the curve with ``curve_bounds``
    (offline reports: it is a quantile search per point).
    """
    usable = [(g, bool(ok)) for g, ok in pairs if not math.isnan(g)]
    n = len(usable)
    ordered = sorted(usable, key=lambda p: -p[0])
    need = min_evidence(target, confidence)
    points: list[tuple[float, int, int]] = []  # (threshold, fired, agreed), descending thresholds
    ok = 0
    for i, (gap, good) in enumerate(ordered, start=1):
        ok += good
        if i < n and ordered[i][0] == gap:
            continue  # a threshold admits every pair with an equal gap
        points.append((gap, i, ok))
    decided: dict[int, CalibrationPoint] = {}  # index -> point with its bound: the chosen and the failed one
    chosen: CalibrationPoint | None = None
    failed: CalibrationPoint | None = None
    last_pass: int | None = None
    for idx, (gap, fired, agreed) in enumerate(points):
        if fired < need:
            continue
        if not reaches(agreed, fired, target, confidence):
            failed = decided[idx] = CalibrationPoint(gap, fired / n, agreed / fired,
                                                     lower_bound(agreed, fired, confidence), fired)
            break
        last_pass = idx
    if last_pass is not None:
        gap, fired, agreed = points[last_pass]
        chosen = decided[last_pass] = CalibrationPoint(gap, fired / n, agreed / fired,
                                                       lower_bound(agreed, fired, confidence), fired)
    curve = [
        decided.get(idx) or CalibrationPoint(
            gap, fired / n, agreed / fired,
            lower_bound(agreed, fired, confidence) if curve_bounds and fired >= need else None, fired,
        )
        for idx, (gap, fired, agreed) in enumerate(points)
    ]
    curve.reverse()  # ascending thresholds, for readers
    if chosen is not None:
        return Calibration(target, confidence, chosen.threshold, chosen.coverage, chosen.precision, chosen.bound,
                           chosen.fired, n, None, curve)
    if failed is None:
        reason = (f"too little evidence: {n} verified answers; a lower bound of {target:g} at confidence "
                  f"{confidence:g} needs at least {need}")
        return Calibration(target, confidence, None, 0.0, None, None, 0, n, reason, curve)
    reason = (f"precision {failed.precision:.3f} (lower bound {failed.bound:.3f}) on the {failed.fired} most "
              f"confident verified answers is under the target {target:g}")
    return Calibration(target, confidence, None, 0.0, failed.precision, failed.bound, 0, n, reason, curve)


def answers_key(candidates: Sequence[str]) -> str:
    """The calibration key of a ``fast_answer`` candidate set (order matters: it is the answer)."""
    digest = hashlib.sha256(json.dumps(list(candidates)).encode()).hexdigest()[:16]
    return f"answers:{digest}"


def session_key(session_id: str) -> str:
    return f"session:{session_id}"


# -- the live gate ----------------------------------------------------------------------


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
class Decision:
    """Where the gate may fire for one request, and on whose evidence."""

    threshold: float | None  # None: closed
    key: str | None  # the calibration key that decided; None for a fixed threshold
    reason: str | None = None

    def fires(self, gap: float) -> bool:
        return self.threshold is not None and not math.isnan(gap) and gap >= self.threshold


@dataclass
class _Evidence:
    pairs: deque[tuple[float, bool]]
    calibration: Calibration | None = None  # cached until the next pair


@dataclass
class Gate:
    """The server's gate: its settings, its evidence per calibration key, its counters.

    ``threshold`` set: a fixed logit-gap threshold with no guarantee (the operator's
    choice). None: the guaranteed gate, calibrated online per key to ``target``.
    """

    enabled: bool = True
    threshold: float | None = None
    target: float = GATE_TARGET
    confidence: float = GATE_CONFIDENCE
    window: int = GATE_WINDOW
    counters: GateCounters = field(default_factory=GateCounters)
    history: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=10_000))
    _keys: OrderedDict[str, _Evidence] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError("the gate's target is a precision in (0, 1)")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError("the gate's confidence must be in (0, 1)")
        if self.window < 1:
            raise ValueError("the gate's window must hold at least one pair")

    @property
    def guaranteed(self) -> bool:
        return self.threshold is None

    def decide(self, keys: Sequence[str], threshold: float | None = None) -> Decision:
        """The gate for a request whose calibration keys are ``keys`` (most specific first,
        the server's last). A ``threshold`` chosen by the request or session, or the
        server's fixed one, is used as it is. Otherwise the most specific key with enough
        evidence to decide decides (open at its threshold, or closed because its bound
        falls short); keys with too little evidence defer to the next."""
        fixed = threshold if threshold is not None else self.threshold
        if fixed is not None:
            return Decision(fixed, None, "fixed threshold, no guarantee")
        with self._lock:
            for key in keys:
                cal = self._calibration(key)
                if cal is not None and cal.enough:
                    return Decision(cal.threshold, key, cal.reason)
            server = self._calibration(SERVER_KEY) or calibrate([], self.target, self.confidence)
        return Decision(None, SERVER_KEY, server.reason)

    def record(self, keys: Sequence[str], gap: float, verified: bool, fired: bool) -> None:
        """Keep one (gap, verified) pair under each of ``keys``; count it if the gate answered."""
        with self._lock:
            self.history.append((gap, verified))
            for key in keys:
                ev = self._keys.get(key)
                if ev is None:
                    ev = self._keys[key] = _Evidence(deque(maxlen=self.window))
                    while len(self._keys) > GATE_MAX_KEYS:
                        self._keys.popitem(last=False)
                self._keys.move_to_end(key)
                ev.pairs.append((gap, verified))
                ev.calibration = None
            if fired:
                self.counters.fires += 1
                if verified:
                    self.counters.verified += 1
                else:
                    self.counters.false_accepts += 1

    def decline(self) -> None:
        with self._lock:
            self.counters.declined += 1

    def forget(self, key: str) -> None:
        """Drop a key's evidence (a deleted session's)."""
        with self._lock:
            self._keys.pop(key, None)

    def pairs(self) -> list[tuple[float, bool]]:
        with self._lock:
            return list(self.history)

    def calibration(self, key: str) -> Calibration:
        """The calibration of ``key`` now (closed with a reason when it has no evidence)."""
        with self._lock:
            return self._calibration(key) or calibrate([], self.target, self.confidence)

    def describe(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """Settings and, per key (all, or ``keys``), threshold, precision, bound, coverage, n."""
        with self._lock:
            names = list(self._keys) if keys is None else [k for k in keys if k in self._keys]
            per_key = {k: self._calibration(k).describe() for k in names}  # type: ignore[union-attr]
        return {
            "enabled": self.enabled,
            "mode": "guaranteed" if self.guaranteed else "fixed",
            "fixed_threshold": self.threshold,
            "target": self.target,
            "confidence": self.confidence,
            "window": self.window,
            "min_evidence": min_evidence(self.target, self.confidence),
            "keys": per_key,
        }

    def _calibration(self, key: str) -> Calibration | None:
        ev = self._keys.get(key)
        if ev is None:
            return None
        if ev.calibration is None:
            ev.calibration = calibrate(list(ev.pairs), self.target, self.confidence)
        return ev.calibration
