"""The llama.cpp peer is optional: without it the bench says why and how to get it."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from headstart.bench.peer_llamacpp import INSTALL_HINT, unavailable


def test_an_interpreter_that_does_not_exist_is_reported() -> None:
    reason = unavailable("/nonexistent/python3")
    assert reason is not None and "cannot run" in reason


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed here")
def test_without_the_extra_the_reason_names_the_package() -> None:
    reason = unavailable(sys.executable)
    assert reason is not None and "llama-cpp-python[server]" in reason
    assert "headstart[peer]" in INSTALL_HINT and "--peer-python" in INSTALL_HINT
