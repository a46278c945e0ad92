"""The proxy-overhead probes of ``headstart bench --replicas``, on two real servers of the
tiny model over loopback (no Ray: what is under test is that both sides get the same
requests, the chat probe's turns land on one existing session per side, and the report
holds what the README's table shows)."""

from __future__ import annotations

import os

from headstart.bench.replicas import Probe, markdown, overhead
from headstart.model import HFBackend
from tests.apiutil import serve

N = 50


def test_overhead_probes_send_the_same_requests_to_both_sides(tiny: HFBackend) -> None:
    with serve(tiny) as direct, serve(tiny) as proxied:
        probes = [Probe("chat", "POST", "/v1/chat/completions", direct.url, proxied.url, chat=True),
                  Probe("models", "GET", "/v1/models", direct.url, proxied.url)]
        rows = overhead(probes, N, {"this process": [os.getpid()]}, idle_s=0.2)
        for side in (direct, proxied):  # one session per side, every chat request a turn of it
            sessions = side.client.get("/v1/sessions").json()["data"]
            assert len(sessions) == 1
            assert side.client.get(f"/v1/sessions/{sessions[0]['id']}").json()["turns"] == N + 3
    chat, models = rows
    for row in rows:
        assert row["requests"] == N
        for side in ("direct", "proxied"):
            assert 0 < row[f"{side}_p50_ms"] <= row[f"{side}_p99_ms"]
        assert row["added_p50_ms"] == round(row["proxied_p50_ms"] - row["direct_p50_ms"], 2)
        assert set(row["cpu_ms_per_request"]) == {"this process"}
    assert "added_p50_minus_server_ms" in chat and "added_p50_minus_server_ms" not in models
    table = markdown({"workload": {"sessions": 1, "requests": 1}, "replicas": 2, "clients": 1, "routing": [],
                      "proxy_overhead": rows, "load": {"before": "b", "after": "a"}})
    assert f"| chat | {chat['direct_p50_ms']} / {chat['direct_p99_ms']} |" in table
    assert f"| models | {models['direct_p50_ms']} / {models['direct_p99_ms']} |" in table
