"""Report computations on hand-made records: no model needed."""

from __future__ import annotations

from typing import Any

from headstart.bench.report import (
    add_correctness,
    build_report,
    failures,
    markdown,
    mismatches,
    ratios,
    repeats,
    shadow_pairs,
)
from headstart.bench.runner import ModeRun, Record


def rec(mode: str, session: str, step: int, path: str, ttft: float, tokens: list[int], **kw: Any) -> Record:
    fields: dict[str, Any] = dict(
        mode=mode, session=session, step=step, kind="turn", path=path, ttft_ms=ttft, decided_ms=ttft,
        e2e_ms=ttft + 100, queue_ms=0.0, background_wait_ms=0.0, prompt_tokens=100, cached_tokens=0,
        tokens=tokens, text="", finish_reason="stop", gap_s=1.0, settle_ms=0.0, arrival_s=0.0,
    )
    fields.update(kw)
    return Record(**fields)


def run(name: str, records: list[Record], exact: bool = True, bg: dict[str, int] | None = None,
        threshold: float | None = None) -> ModeRun:
    gate = {"enabled": threshold is not None, "threshold": threshold, "fires": 0, "verified": 0,
            "false_accepts": 0, "declined": 0}
    return ModeRun(name, name, exact, records, 10.0, bg or {"computed": 0, "reused": 0, "wasted": 0}, gate, [])


def test_mismatches_count_whole_answers_and_first_tokens() -> None:
    ref = run("stateless", [rec("stateless", "a", 0, "cold", 100, [1, 2, 3]), rec("stateless", "a", 1, "cold", 100,
                                                                                   [4, 5])])
    other = run("gate", [rec("gate", "a", 0, "cold", 100, [1, 2, 3]), rec("gate", "a", 1, "gate", 1, [9, 5])])
    assert mismatches(other, ref) == {"mismatches": 1, "first_token_mismatches": 1, "compared": 2}
    assert mismatches(other, None)["mismatches"] is None


def test_repeats_flag_answers_that_start_like_the_previous_one() -> None:
    records = [
        rec("stateless", "a", 0, "cold", 1, [7, 1]),
        rec("stateless", "a", 1, "cold", 1, [7, 2]),
        rec("stateless", "a", 2, "cold", 1, [8]),
        rec("stateless", "b", 0, "cold", 1, [], answer="Yes"),
        rec("stateless", "b", 1, "cold", 1, [], answer="Yes"),
    ]
    assert repeats(records) == {("a", 1): True, ("a", 2): False, ("b", 1): True}


def test_shadow_pairs_take_fired_and_silent_verdicts_and_can_leave_out_repeats() -> None:
    records = [
        rec("gate", "a", 0, "cold", 1, [1]),
        rec("gate", "a", 1, "gate", 1, [1], logit_gap=5.0, verified=True),
        rec("gate", "a", 2, "entry", 1, [2], shadow={"gap": 1.0, "agree": False, "choice": 3}),
    ]
    r = run("gate", records)
    assert shadow_pairs(r) == [(5.0, True), (1.0, False)]
    assert shadow_pairs(r, {("a", 1): True}) == [(1.0, False)]


def _runs() -> dict[str, ModeRun]:
    stateless = run("stateless", [rec("stateless", "s", i, "cold", 1000 + i, [10 + i], truth="Yes",
                                      answer="Yes" if i % 2 else "No") for i in range(4)])
    prefix = run("prefix_cache", [rec("prefix_cache", "s", i, "prefix", 500, [10 + i]) for i in range(4)])
    pre = run("prepositioned", [
        rec("prepositioned", "s", 0, "cold", 1000, [10]),
        rec("prepositioned", "s", 1, "ready_exact", 1, [11]),
        rec("prepositioned", "s", 2, "entry", 200, [12], shadow={"gap": 4.0, "agree": True, "choice": 12}),
        rec("prepositioned", "s", 3, "entry", 200, [13], shadow={"gap": 1.0, "agree": False, "choice": 0}),
    ], bg={"computed": 40, "reused": 10, "wasted": 20})
    gate = run("gate", [
        rec("gate", "s", 0, "cold", 1000, [10]),
        rec("gate", "s", 1, "ready_exact", 1, [11]),
        rec("gate", "s", 2, "gate", 1, [12], logit_gap=4.0, verified=True, truth="Yes", answer="Yes"),
        rec("gate", "s", 3, "gate", 1, [99], logit_gap=2.5, verified=False),
    ], exact=False, threshold=2.0)
    return {"stateless": stateless, "prefix_cache": prefix, "prepositioned": pre, "gate": gate}


def test_the_report_has_the_promised_shape_and_figures() -> None:
    runs = _runs()
    report = build_report({"name": "t", "seed": 0, "sessions": 1, "requests": 4, "gaps": "x"},
                          {"name": "m", "device": "cpu"}, runs, target=0.9, clients=1)
    assert set(report) >= {"workload", "model", "machine", "modes", "gate"}
    for name, m in report["modes"].items():
        assert set(m["ttft_ms"]) >= {"p50", "p90", "p99", "mean"}
        assert set(m["e2e_ms"]) >= {"p50", "p90", "p99", "mean"}
        assert set(m["background_tokens"]) >= {"computed", "reused", "wasted"}
        assert set(m["foreground_wait_ms"]) >= {"p50", "p99"}
        assert m["requests"] == 4, name
    pre = report["modes"]["prepositioned"]
    assert pre["paths"] == {"ready_exact": 1, "entry": 2, "cold": 1}
    # 10 of the 40 computed were never used nor dropped before the end: wasted too.
    assert pre["background_tokens"]["wasted"] == 30
    assert pre["background_tokens"]["per_request"]["computed"] == 10.0
    assert report["modes"]["gate"]["mismatches"] == 1
    g = report["gate"]
    assert (g["threshold"], g["fires"], g["false_accepts"], g["precision"], g["coverage"]) == (2.0, 2, 1, 0.5, 0.75)
    cal = g["calibration"]
    assert cal["source"] == "prepositioned" and cal["rests_on"] == 2
    # Two verified answers cannot bound a precision near 0.9: the guaranteed gate stays closed.
    assert cal["threshold"] is None and cal["fired"] == 0 and "too little evidence" in cal["reason"]
    assert cal["coverage"] == 0.25  # the one exact hit, of four requests
    assert [(p["threshold"], p["precision"], p["bound"]) for p in cal["curve"]] == [(1.0, 0.5, None), (4.0, 1.0, None)]
    assert g["correctness"]["real_answers"] == {"correct": 0.5, "n": 4}
    assert g["correctness"]["gate_answers"] == {"correct": 1.0, "n": 1}
    assert failures(report) == []
    text = markdown(report)
    assert "| prepositioned |" in text and "Guaranteed calibration" in text and "too little evidence" in text


def test_an_exact_mode_that_differs_from_stateless_is_a_failure() -> None:
    runs = _runs()
    runs["session"] = run("session", [rec("session", "s", i, "session", 300, [10 + i + (i == 2)]) for i in range(4)])
    report = build_report({"name": "t", "seed": 0, "sessions": 1, "requests": 4, "gaps": "x"},
                          {"name": "m"}, runs, target=0.9, clients=1)
    assert failures(report) == ["session: 1 of 4 outputs differ from stateless"]


def test_an_exact_mode_not_compared_on_every_request_is_a_failure() -> None:
    runs = _runs()
    # Keys the reference does not have: nothing to compare, so 0 mismatches proves nothing.
    runs["session"] = run("session", [rec("session", "other", i, "session", 300, [10 + i]) for i in range(4)])
    report = build_report({"name": "t", "seed": 0, "sessions": 1, "requests": 4, "gaps": "x"},
                          {"name": "m"}, runs, target=0.9, clients=1)
    assert report["modes"]["session"]["mismatches"] == 0
    assert failures(report) == ["session: only 0 of 4 outputs compared with stateless"]


def test_ratios_put_each_mode_over_the_baselines() -> None:
    modes = {
        "stateless": {"ttft_ms": {"p50": 1000.0}, "e2e_ms": {"p50": 2000.0}},
        "prefix_cache": {"ttft_ms": {"p50": 500.0}, "e2e_ms": {"p50": 1000.0}},
        "gate": {"ttft_ms": {"p50": 5.0}, "e2e_ms": {"p50": 500.0}},
    }
    r = ratios(modes)["gate"]
    assert r["ttft_p50_over_stateless"] == 0.005
    assert r["ttft_p50_over_prefix_cache"] == 0.01
    assert r["e2e_p50_over_prefix_cache"] == 0.5


def test_predicted_deltas_are_compared_by_coverage_at_the_target_and_cost() -> None:
    runs = _runs()
    runs["prepositioned:empty"] = run("prepositioned:empty", [
        rec("prepositioned:empty", "s", 0, "cold", 1000, [10]),
        rec("prepositioned:empty", "s", 1, "entry", 200, [11], shadow={"gap": 3.0, "agree": True, "choice": 11}),
        rec("prepositioned:empty", "s", 2, "entry", 200, [12], shadow={"gap": 3.0, "agree": True, "choice": 12}),
        rec("prepositioned:empty", "s", 3, "entry", 200, [13], shadow={"gap": 0.5, "agree": False, "choice": 1}),
    ], bg={"computed": 8, "reused": 8, "wasted": 0})
    report = build_report({"name": "t", "seed": 0, "sessions": 1, "requests": 4, "gaps": "x"},
                          {"name": "m"}, runs, target=0.2, clients=1, predictor="continuation")
    preds = report["predictors"]
    assert set(preds) == {"continuation", "empty"}
    # A bound of 0.2 needs two verified answers: continuation has one agreeing and one not
    # (closed: its exact hit only), empty two agreeing at gap 3 (open there).
    assert preds["continuation"]["coverage_at_target"] == 0.25 and preds["continuation"]["threshold"] is None
    assert preds["empty"]["coverage_at_target"] == 0.5 and preds["empty"]["threshold"] == 3.0
    assert preds["empty"]["background_tokens_per_request"]["computed"] == 2.0
    assert "| empty |" in markdown(report)


def test_the_curve_says_how_often_gate_answers_are_right_by_the_rule() -> None:
    yn = ["Yes", "No"]
    records = [
        rec("prepositioned", "s", 1, "entry", 1, [], truth="Yes", candidates=yn, answer="Yes",
            shadow={"gap": 3.0, "agree": True, "choice": 0}),
        rec("prepositioned", "s", 2, "entry", 1, [], truth="Yes", candidates=yn, answer="No",
            shadow={"gap": 1.0, "agree": True, "choice": 1}),
    ]
    curve = [{"threshold": 1.0}, {"threshold": 3.0}, {"threshold": 5.0}]
    add_correctness(curve, records)
    assert [p["correct"] for p in curve] == [0.5, 1.0, None]


def test_requests_that_shared_the_model_with_another_session_are_flagged() -> None:
    from headstart.bench.runner import mark_overlaps

    records = [
        rec("m", "a", 0, "cold", 1, [], arrival_s=0.0, e2e_ms=1000),
        rec("m", "b", 0, "cold", 1, [], arrival_s=0.5, e2e_ms=1000),  # overlaps a/0
        rec("m", "a", 1, "cold", 1, [], arrival_s=1.6, e2e_ms=100),  # after b/0 ended at 1.5 s
        rec("m", "a", 2, "cold", 1, [], arrival_s=3.0, e2e_ms=100),
    ]
    mark_overlaps(records)
    assert [r.overlapped for r in records] == [True, True, False, False]
