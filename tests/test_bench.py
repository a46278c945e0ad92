"""``headstart bench`` and ``headstart calibrate`` end to end on the default model (small sizes).

These check what a run produces (report shape, exactness, paths, plots), never absolute
times: the machine is shared and its speed is not the code's to promise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headstart.bench.modes import BASE_MODES
from headstart.bench.workloads import make_workload
from headstart.cli.main import main

pytestmark = pytest.mark.real

EXACT = ("prefix_cache", "session", "prepositioned")


def _bench(tmp_path: Path, *args: str) -> dict:
    report = tmp_path / "r.json"
    rc = main(["--log-level", "WARNING", "bench", *args, "--json", str(report), "--out", str(tmp_path / "plots"),
               "--no-progress"])
    assert rc == 0
    return json.loads(report.read_text())


def test_quick_agent_bench_compares_every_mode_exactly_and_draws_its_plots(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--workload", "agent", "--quick")
    requests = make_workload("agent", quick=True).requests
    assert report["workload"]["name"] == "agent" and report["workload"]["requests"] == requests
    assert report["model"]["name"] == "smollm2-135m"
    assert {"cpu", "cores"} <= set(report["machine"])
    assert list(report["modes"]) == list(BASE_MODES)
    for name, m in report["modes"].items():
        assert m["requests"] == requests, name
        for key in ("ttft_ms", "e2e_ms"):
            assert all(m[key][q] is not None and m[key][q] > 0 for q in ("p50", "p90", "p99", "mean")), (name, key)
        assert set(m["background_tokens"]) >= {"computed", "reused", "wasted"}
        assert set(m["foreground_wait_ms"]) >= {"p50", "p99"}
        assert sum(m["paths"].values()) == requests
    for name in EXACT:
        assert report["modes"][name]["compared"] == requests, name  # every request compared...
        assert report["modes"][name]["mismatches"] == 0, name  # ...and every one the same
    modes = report["modes"]
    assert modes["stateless"]["paths"] == {"cold": requests}
    assert modes["prefix_cache"]["paths"].get("prefix", 0) > 0
    assert modes["session"]["paths"].get("session", 0) > 0
    assert modes["prepositioned"]["paths"].get("entry", 0) + modes["prepositioned"]["paths"].get("ready_exact", 0) > 0
    assert modes["stateless"]["background_tokens"]["computed"] == 0
    assert modes["prepositioned"]["background_tokens"]["computed"] > 0
    gate = report["gate"]
    assert {"threshold", "coverage", "precision", "false_accepts"} <= set(gate)
    assert gate["threshold"] == 2.0 and gate["calibration"]["source"] == "prepositioned"
    for png in ("agent-ttft-cdf.png", "agent-gate-curve.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_stream_questions_meet_their_ready_position_and_are_judged_by_the_rule(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--workload", "stream", "--quick", "--sessions", "1", "--turns", "3",
                    "--modes", "stateless,prepositioned,gate")
    modes = report["modes"]
    assert modes["prepositioned"]["compared"] == modes["prepositioned"]["requests"] == 3
    assert modes["prepositioned"]["mismatches"] == 0
    # The second question comes with no new data: the registered question's ready position is exact.
    assert modes["prepositioned"]["paths"].get("ready_exact", 0) >= 1
    assert modes["prepositioned"]["ttft_ms"]["p50"] is not None
    assert modes["stateless"]["correct"]["n"] == 3
    correctness = report["gate"]["correctness"]
    assert correctness["real_answers"]["n"] == 3 and "gate_answers" in correctness


def test_calibrate_prints_a_threshold_and_the_requests_it_rests_on(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cal.json"
    rc = main(["--log-level", "WARNING", "calibrate", "--workload", "stream", "--sessions", "1", "--turns", "4",
               "--target", "0.9", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["requests"] == 4
    assert result["rests_on"] >= 1 and result["curve"]
    out = capsys.readouterr().out
    assert f"{result['rests_on']} had a ready position and a different prompt (the calibration rests on these)" in out
    # Four requests cannot bound a precision of 0.9 (that takes 29 right of 29): the gate stays
    # closed, and the reason says so instead of a threshold resting on a handful of answers.
    assert result["threshold"] is None and result["bound"] is None
    assert f"The gate stays closed for this model and traffic: too little evidence: {result['rests_on']} " \
           "verified answers" in out
