"""Client threads, the one way every benchmark runs its clients at once.

Kept apart from runner.py (which loads the engine and torch) so that a benchmark driving
servers over HTTP, such as replicas.py, runs its clients without importing the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


def run_threads(work: Sequence[Callable[[], None]]) -> float:
    """Each of ``work`` on a thread of its own, all started at once: the wall seconds until the
    last one is done. The first failure of any is re-raised once every thread has finished, so no
    benchmark reports figures from a run in which a client gave up."""
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=guarded, args=(job,), daemon=True) for job in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return wall
