"""The llama.cpp peer is optional: without it the bench says why and how to get it; with its
figures (as a run records them) the sweep and the model-only tables and plots show it beside
headstart. The peer itself cannot be installed in CI (a 10-minute build): its path is exercised
by the benchmark runs whose results the README quotes."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

from headstart.bench import model_only, peer_model, sweep
from headstart.bench.peer_llamacpp import INSTALL_HINT, unavailable


def test_an_interpreter_that_does_not_exist_is_reported() -> None:
    reason = unavailable("/nonexistent/python3")
    assert reason is not None and "cannot run" in reason


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed here")
def test_without_the_extra_the_reason_names_the_package() -> None:
    reason = unavailable(sys.executable)
    assert reason is not None and "llama-cpp-python[server]" in reason
    assert "headstart[peer]" in INSTALL_HINT and "--peer-python" in INSTALL_HINT


def _args(python: str) -> Namespace:
    return Namespace(peer_python=python, model=None, cache_dir=None, reps=2)


def test_the_sweep_skips_the_peer_with_the_reason_and_the_way_to_install_it() -> None:
    gguf, why = sweep._peer_gguf(_args("/nonexistent/python3"))
    assert gguf is None
    assert why.startswith("skipped: cannot run /nonexistent/python3") and INSTALL_HINT in why


def _row(clients: int, tok_s: float, ttft: tuple[float, float], e2e: tuple[float, float]) -> dict[str, Any]:
    return {"clients": clients, "requests": 8, "output_tokens": 128, "wall_s": 128 / tok_s, "tokens_per_s": tok_s,
            "ttft_all_ms": {"p50": ttft[0], "p99": ttft[1]}, "e2e_ms": {"p50": e2e[0], "p99": e2e[1]}}


def _ours(clients: int, tok_s: float, ttft: tuple[float, float], e2e: tuple[float, float]) -> dict[str, Any]:
    steps = {"p50": 80.0, "p99": 240.0}
    return _row(clients, tok_s, ttft, e2e) | {
        "ttft_ms": {"cold": {"p50": ttft[0], "p99": ttft[1], "n": 8}}, "background_wait_ms_max": 0.0,
        "step_ms": steps, "step_sequences": {"p50": float(clients)}, "step_tokens": steps,
        "background_tokens_per_step": 1.0, "background_budget_share": 0.02, "max_sequences": clients}


def _recorded_sweep(peer: bool) -> dict[str, Any]:
    """A sweep report shaped as run_sweep writes it (figures from a run on the 2-core CPU)."""
    return {
        "model": "smollm2-135m", "sessions": 8, "turns": 1, "max_tokens": 16, "step_tokens": 64,
        "sweep": [_ours(1, 10.5, (316, 343), (1510, 1684)), _ours(8, 39.5, (1509, 1520), (3224, 3234))],
        "peer_sweep": [_row(1, 30.0, (120, 150), (540, 600)), _row(8, 31.0, (2800, 4100), (3300, 4600))]
        if peer else [],
        "peer": "llama.cpp server (llama-cpp-python 0.3.36)" if peer else "skipped: no llama_cpp. To run it: x",
    }


def test_the_sweep_table_has_a_column_per_server_from_a_recorded_result() -> None:
    text = sweep.markdown(_recorded_sweep(peer=True))
    header = next(line for line in text.splitlines() if line.startswith("| clients | output tok/s headstart"))
    assert "output tok/s llama.cpp (vs 1)" in header and "TTFT p50 / p99 ms llama.cpp" in header
    assert "e2e p50 / p99 ms llama.cpp" in header
    assert "| 1 | 10.5 (1.00x) | 30.0 (1.00x) | 2.86 | 316 / 343 | 120 / 150 | 1510 / 1684 | 540 / 600 |" in text
    assert "| 8 | 39.5 (3.76x) | 31.0 (1.03x) | 0.78 | 1509 / 1520 | 2800 / 4100 | 3224 / 3234 | 3300 / 4600 |" in text
    assert "peer: llama.cpp server (llama-cpp-python 0.3.36)" in text


def test_without_the_peer_the_sweep_says_why_and_has_no_peer_column() -> None:
    text = sweep.markdown(_recorded_sweep(peer=False))
    assert "peer: skipped: no llama_cpp. To run it: x" in text and "llama.cpp" not in text


def test_the_sweep_plot_draws_the_peer_beside_headstart(tmp_path: Path) -> None:
    report = _recorded_sweep(peer=True)
    drawn = sweep.series(report)
    assert drawn == {
        "headstart": {"clients": [1, 8], "tokens_per_s": [10.5, 39.5], "ttft_p99_ms": [343, 1520]},
        "llama.cpp": {"clients": [1, 8], "tokens_per_s": [30.0, 31.0], "ttft_p99_ms": [150, 4100]},
    }
    assert list(sweep.series(_recorded_sweep(peer=False))) == ["headstart"]
    png = sweep.plot(report, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_clients_run_every_session_once_each_client_one_session_at_a_time() -> None:
    running: dict[int, int] = {}
    lock = threading.Lock()

    def session(i: int) -> list[tuple[int, str]]:
        me = threading.get_ident()
        with lock:
            running[me] = running.get(me, 0) + 1
            overlap = running[me]
        time.sleep(0.01)
        with lock:
            running[me] -= 1
        return [(i, f"{me}:{overlap}")]

    done, wall = sweep._busy(3, 8, session)
    assert sorted(i for i, _ in done) == list(range(8))
    assert all(tag.endswith(":1") for _, tag in done)  # never two sessions at once on one client
    by_client: dict[str, list[int]] = {}
    for i, tag in done:
        by_client.setdefault(tag, []).append(i)
    assert sorted(sorted(v) for v in by_client.values()) == [[0, 3, 6], [1, 4, 7], [2, 5]]  # round-robin
    assert wall > 0


def test_a_failing_session_fails_the_sweep() -> None:
    def session(i: int) -> list[int]:
        if i == 5:
            raise RuntimeError("the server answered 500")
        return [i]

    with pytest.raises(RuntimeError, match="answered 500"):
        sweep._busy(2, 8, session)


def _recorded_model_only() -> dict[str, Any]:
    return {
        "model": "smollm2-135m",
        "decode_ms": {"transformers": {128: 92.3, 512: 90.2}, "runner": {128: 55.6, 512: 64.8}},
        "prefill_tok_s": {"transformers": 374.0, "runner": 424.0},
        "batched_decode_tok_s": {"runner": {1: 13.7, 8: 63.9}},
        "batched_context": 128,
        "llama_cpp": "not run",
    }


def test_the_model_only_table_has_llamacpp_beside_the_others_from_a_recorded_result(tmp_path: Path) -> None:
    peer = {"version": "0.3.36", "decode_ms": {128: 18.0, 512: 22.55}, "prefill_tok_s": 935.0,
            "batched_decode_tok_s": {1: 50.0, 8: 150.0}}
    r = peer_model.add_to(_recorded_model_only(), peer, "", threads=2)
    text = model_only.format_table(r)
    assert "llama.cpp: llama-cpp-python 0.3.36 on the same GGUF, 2 threads" in text
    assert "| llama.cpp | 18.0 (0.20x) | 22.6 (0.25x) |" in text
    assert "llama.cpp 935 (2.50x)" in text
    assert "| runner tok/s (vs 1) | llama.cpp tok/s (vs 1) |" in text
    assert "| 8 | 63.9 (4.66x) | 150.0 (3.00x) |" in text
    assert model_only.plot(r, tmp_path / "mo.png").read_bytes()[:4] == b"\x89PNG"


def test_the_model_only_bench_skips_llamacpp_with_the_reason() -> None:
    r = peer_model.run(_args("/nonexistent/python3"), _recorded_model_only(), [1, 2, 3], [128], [1], 16)
    assert r["llama_cpp"].startswith("skipped: cannot run /nonexistent/python3") and INSTALL_HINT in r["llama_cpp"]
    assert "llama.cpp" not in r["decode_ms"]
    assert "llama.cpp: skipped: cannot run" in model_only.format_table(r)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed here")
def test_a_failed_llamacpp_measurement_says_what_the_child_said(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)measurement failed .*No module named 'llama_cpp'"):
        peer_model.measure(sys.executable, tmp_path / "none.gguf", [1, 2, 3], [2], [1], 2, 2, 1)
