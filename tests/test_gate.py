"""The gate's guarantee: the Clopper-Pearson bound on known binomial cases, calibration that
stays closed on too little evidence and opens as it accrues, recloses under drift, and
decides per key. Pure arithmetic: no model."""

from __future__ import annotations

import math
import random

import pytest

from headstart.engine.gate import (
    SERVER_KEY,
    Gate,
    answers_key,
    beta_quantile,
    betainc,
    calibrate,
    lower_bound,
    min_evidence,
    reaches,
    session_key,
)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k), summed exactly: an independent check of the beta function."""
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize(("a", "b", "x"), [(1, 1, 0.3), (2.5, 1, 0.7), (1, 4, 0.2), (7, 7, 0.5), (30, 3, 0.95)])
def test_incomplete_beta_matches_closed_forms(a: float, b: float, x: float) -> None:
    if a == 1:
        expected = 1 - (1 - x) ** b
    elif b == 1:
        expected = x**a
    else:
        expected = 0.5 if x == 0.5 and a == b else binomial_tail(int(a), int(a + b - 1), x)
    assert betainc(a, b, x) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("k", "n"), [(1, 1), (3, 10), (7, 10), (50, 60), (59, 59), (990, 1000), (1, 1000)])
@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
def test_incomplete_beta_is_the_binomial_tail(k: int, n: int, p: float) -> None:
    assert betainc(k, n - k + 1, p) == pytest.approx(binomial_tail(k, n, p), rel=1e-9, abs=1e-300)


def test_clopper_pearson_lower_bound_on_known_cases() -> None:
    # Published two-sided 95% intervals: their lower ends are one-sided 97.5% bounds.
    assert lower_bound(7, 10, 0.975) == pytest.approx(0.3475, abs=5e-5)
    assert lower_bound(50, 100, 0.975) == pytest.approx(0.3983, abs=5e-5)
    assert lower_bound(0, 10, 0.95) == 0.0
    for n in (1, 10, 59, 400):  # all right: the bound is (1 - confidence) ** (1 / n)
        assert lower_bound(n, n, 0.95) == pytest.approx(0.05 ** (1 / n), rel=1e-12)
    for k, n in [(3, 10), (50, 60), (990, 1000)]:  # the defining equation, checked by exact sums
        assert binomial_tail(k, n, lower_bound(k, n, 0.95)) == pytest.approx(0.05, rel=1e-8)
    bounds = [lower_bound(k, 60, 0.95) for k in range(61)]
    assert bounds == sorted(bounds)
    assert beta_quantile(0.5, 7, 7) == pytest.approx(0.5, abs=1e-12)


def test_reaches_agrees_with_the_bound_and_min_evidence_is_the_first_count() -> None:
    for k, n in [(56, 60), (57, 60), (58, 60), (59, 60), (60, 60), (58, 58), (59, 59)]:
        assert reaches(k, n, 0.95, 0.95) == (lower_bound(k, n, 0.95) >= 0.95)
    assert min_evidence(0.95, 0.95) == 59  # 0.95 ** 58 > 0.05 >= 0.95 ** 59
    assert lower_bound(58, 58, 0.95) < 0.95 <= lower_bound(59, 59, 0.95)
    assert min_evidence(0.9, 0.99) == math.ceil(math.log(0.01) / math.log(0.9))
    with pytest.raises(ValueError):
        min_evidence(1.0, 0.95)


def test_too_little_evidence_keeps_the_gate_closed_with_a_reason() -> None:
    need = min_evidence(0.95, 0.95)
    closed = calibrate([(5.0, True)] * (need - 1))
    assert closed.threshold is None and not closed.enough
    assert closed.reason is not None and "too little evidence" in closed.reason and str(need) in closed.reason
    opened = calibrate([(5.0, True)] * need)
    assert opened.threshold == 5.0 and opened.bound is not None and opened.bound >= 0.95
    # enough evidence, but wrong too often: closed, and the reason says by how much
    bad = calibrate([(5.0, True)] * 90 + [(5.0, False)] * 10)
    assert bad.threshold is None and bad.enough and "under the target" in (bad.reason or "")


def test_the_lowest_passing_threshold_is_chosen_and_the_descent_stops_at_a_failure() -> None:
    pairs = [(8.0 + i / 100, True) for i in range(100)] + [(2.0, False)] * 3 + [(1.0, False)] * 40
    cal = calibrate(pairs)
    assert cal.threshold == 8.0 and cal.fired == 100 and cal.precision == 1.0
    assert cal.coverage == pytest.approx(100 / 143)
    # A failing slice ends the descent even where a lower threshold would pass again: looking
    # further down would spend the confidence on more tests than the bound accounts for.
    trap = [(10.0, True)] * 100 + [(5.0, False)] * 20 + [(1.0, True)] * 2000
    assert calibrate(trap).threshold == 10.0
    assert calibrate(trap[120:]).threshold == 1.0


def test_the_guarantee_holds_when_the_true_precision_is_under_the_target() -> None:
    """Streams whose answers agree 93% of the time, whatever the gap: a gate aiming for
    95% at confidence 95% may open on at most about 5% of them."""
    rng = random.Random(7)
    opened = 0
    trials = 400
    for _ in range(trials):
        pairs = [(rng.uniform(0, 10), rng.random() < 0.93) for _ in range(200)]
        opened += calibrate(pairs).threshold is not None
    assert opened / trials <= 0.05 + 0.02  # binomial noise of 400 trials


def test_the_live_gate_opens_as_evidence_accrues() -> None:
    gate = Gate()
    keys = (session_key("s"), SERVER_KEY)
    need = min_evidence(gate.target, gate.confidence)
    for i in range(need - 1):
        gate.record(keys, 4.0 + i / 1000, True, fired=False)
        assert gate.decide(keys).threshold is None
    assert "too little evidence" in (gate.decide(keys).reason or "")
    gate.record(keys, 3.0, True, fired=False)
    decision = gate.decide(keys)
    assert decision.threshold == 3.0 and decision.key == "session:s"
    assert decision.fires(3.0) and not decision.fires(2.9) and not decision.fires(float("nan"))
    assert gate.counters.fires == 0  # shadow checks are evidence, not fires


def test_drift_closes_the_gate_again() -> None:
    """A stream that agreed always, then 70% of the time: the bounded window lets the old
    evidence age out and the gate closes within one window."""
    window = 200
    gate = Gate(window=window)
    keys = (SERVER_KEY,)
    rng = random.Random(3)
    for _ in range(window):
        gate.record(keys, rng.uniform(2, 6), True, fired=True)
    assert gate.decide(keys).threshold is not None
    closed_after = None
    for i in range(2 * window):
        gate.record(keys, rng.uniform(2, 6), rng.random() < 0.7, fired=True)
        if closed_after is None and gate.decide(keys).threshold is None:
            closed_after = i + 1
    assert closed_after is not None and closed_after <= window
    final = gate.decide(keys)
    assert final.threshold is None and "under the target" in (final.reason or "")
    cal = gate.calibration(SERVER_KEY)
    assert cal.samples == window  # memory stays bounded
    assert gate.counters.fires == 3 * window
    assert gate.counters.verified + gate.counters.false_accepts == gate.counters.fires


def test_each_key_has_its_own_threshold_and_sparse_keys_defer_to_the_server() -> None:
    gate = Gate()
    a, b, sparse = answers_key(["yes", "no"]), answers_key(["no", "yes"]), session_key("new")
    assert a != b  # the order of the candidates is part of the answer
    for i in range(120):
        gap = i / 10  # 0 .. 11.9
        gate.record((a, SERVER_KEY), gap, gap >= 6.0, fired=False)  # a: right only when sure
        gate.record((b, SERVER_KEY), gap, True, fired=False)  # b: always right
    da, db = gate.decide((a, SERVER_KEY)), gate.decide((b, SERVER_KEY))
    assert da.key == a and da.threshold is not None and da.threshold >= 6.0
    assert db.key == b and db.threshold == 0.0
    for _ in range(5):  # some evidence of its own, too little to decide
        gate.record((sparse,), 9.0, True, fired=False)
    ds = gate.decide((sparse, SERVER_KEY))
    server = gate.calibration(SERVER_KEY)
    assert ds.key == SERVER_KEY and ds.threshold == server.threshold
    # a key with enough evidence that fails closes the gate even where the server would fire
    for _ in range(100):
        gate.record((sparse,), 9.0, False, fired=False)
    assert gate.decide((sparse, SERVER_KEY)).threshold is None
    described = gate.describe()["keys"]
    assert set(described) == {a, b, SERVER_KEY, sparse}
    assert {"threshold", "precision", "bound", "coverage", "n", "reason"} <= set(described[a])
    gate.forget(sparse)
    assert sparse not in gate.describe()["keys"]


def test_a_fixed_threshold_has_no_guarantee_and_ignores_the_evidence() -> None:
    gate = Gate(threshold=1.0)
    assert gate.decide((SERVER_KEY,)).threshold == 1.0
    assert gate.decide((SERVER_KEY,), threshold=0.0).threshold == 0.0  # a request's own wins
    guaranteed = Gate()
    assert guaranteed.decide((SERVER_KEY,), threshold=0.5).threshold == 0.5
    assert guaranteed.decide((SERVER_KEY,)).threshold is None
    with pytest.raises(ValueError):
        Gate(target=1.0)
