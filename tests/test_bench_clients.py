"""The benchmarks' client threads: all at once, and a failing client fails the run."""

from __future__ import annotations

import threading

import pytest

from headstart.bench.clients import run_threads


def test_every_client_runs_at_the_same_time() -> None:
    meet = threading.Barrier(3, timeout=10)  # broken (and raised) unless all three are in flight together
    passed: list[int] = []

    def client(k: int) -> None:
        meet.wait()
        passed.append(k)

    wall = run_threads([lambda k=k: client(k) for k in range(3)])
    assert sorted(passed) == [0, 1, 2]
    assert wall > 0


def test_the_first_failure_is_raised_after_every_client_finished() -> None:
    finished: list[int] = []
    release = threading.Event()

    def failing() -> None:
        raise RuntimeError("client 0 lost its server")

    def slow() -> None:
        release.wait(10)
        finished.append(1)

    def releasing() -> None:
        release.set()
        finished.append(2)

    with pytest.raises(RuntimeError, match="client 0 lost its server"):
        run_threads([failing, slow, releasing])
    assert sorted(finished) == [1, 2]  # the run waited for the others before raising
