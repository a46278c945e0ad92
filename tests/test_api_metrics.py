"""``/metrics`` parses as Prometheus text and counts exactly the requests that were made."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from headstart.model import HFBackend
from tests.apiutil import serve, settle

HI = [{"role": "user", "content": "Hello."}]


def scrape(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted labels: value}} from every family."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_count_the_requests_made_by_path(tiny: HFBackend) -> None:
    with serve(tiny) as srv:
        c = srv.client
        before = scrape(c.get("/metrics").text)
        assert before["headstart_model_loaded"][()] == 1.0
        assert "headstart_ttft_seconds_count" not in before
        paths: Counter[str] = Counter()
        prompt_tokens = 0

        def chat(session: str | None, messages: list[dict]) -> dict:
            nonlocal prompt_tokens
            headers = {"x-session-id": session} if session else {}
            body = c.post("/v1/chat/completions", headers=headers,
                          json={"messages": messages, "max_tokens": 2, "temperature": 0}).json()
            paths[body["headstart"]["path"]] += 1
            prompt_tokens += body["usage"]["prompt_tokens"]
            return body

        def generate(session: str, **fields: object) -> dict:
            nonlocal prompt_tokens
            body = c.post(f"/v1/sessions/{session}/generate", json={"max_tokens": 2, "temperature": 0, **fields}).json()
            paths[body["path"]] += 1
            prompt_tokens += body["usage"]["prompt_tokens"]
            return body

        chat(None, HI)  # a one-off: cold
        first = chat("m", HI)
        settle(srv, "m")
        turn2 = [*HI, {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "More."}]
        second = chat("m", turn2)  # entry (pre-positioned) or ready_exact
        c.post("/v1/sessions", json={"id": "d", "system": "Say yes or no."})
        c.post("/v1/sessions/d/queries", json={"id": "q", "question": "Yes?", "max_tokens": 2})
        c.post("/v1/sessions/d/push", json={"entries": ["x"]})
        settle(srv, "d")
        assert generate("d", prompt="Yes?")["path"] == "ready_exact"
        # generate is not streamed, so even a forced gate leaves its answer exact
        assert generate("d", prompt="No?", fast_answer=["yes", "no"], gap_threshold=0)["path"] != "gate"
        settle(srv, "d")
        generate("d", prompt="Maybe?", gate=False)
        settle(srv, "m")
        # A streamed turn with the gate forced open by the request: answered by the gate.
        turn3 = [*turn2, {"role": "assistant", "content": second["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "Yes or no?"}]
        with c.stream("POST", "/v1/chat/completions", headers={"x-session-id": "m"},
                      json={"messages": turn3, "max_tokens": 2, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}, "gap_threshold": 0,
                            "fast_answer": ["yes", "no"]}) as r:
            last = json.loads([line for line in r.iter_lines() if line.startswith("data: {")][-1][6:])
        assert last["headstart"]["path"] == "gate" and isinstance(last["headstart"]["verified"], bool)
        paths["gate"] += 1
        prompt_tokens += last["usage"]["prompt_tokens"]
        settle(srv)

        after = scrape(c.get("/metrics").text)
        counted = {dict(k)["path"]: v for k, v in after["headstart_ttft_seconds_count"].items()}
        assert counted == dict(paths)
        assert {dict(k)["path"]: v for k, v in after["headstart_requests_total"].items()} == dict(paths)
        assert after["headstart_ttft_seconds_bucket"][(("le", "+Inf"), ("path", "gate"))] == paths["gate"]
        assert after["headstart_tokens_total"][(("kind", "prompt"),)] == prompt_tokens
        assert after["headstart_tokens_total"][(("kind", "cached"),)] > 0
        assert after["headstart_gate_fires_total"][()] == paths["gate"] == 1
        assert after["headstart_gate_verified_total"][()] + after["headstart_gate_false_accepts_total"][()] == 1
        # the server's own gate is the guaranteed one, closed on this little evidence, and says why
        assert after["headstart_gate_guaranteed"][()] == 1.0 and after["headstart_gate_target"][()] == 0.95
        assert after["headstart_gate_evidence"][(("key", "server"),)] >= 2
        assert after["headstart_gate_evidence"][(("key", "session:m"),)] >= 1
        (closed,) = [dict(k)["reason"] for k in after["headstart_gate_closed"] if dict(k)["key"] == "server"]
        assert "too little evidence" in closed
        assert after["headstart_background_tokens_total"][(("kind", "computed"),)] > 0
        assert after["headstart_background_tokens_total"][(("kind", "reused"),)] > 0
        assert (("kind", "wasted"),) in after["headstart_background_tokens_total"]
        assert after["headstart_sessions"][()] == 2
        assert after["headstart_kv_bytes"][()] > 0
        fg = after["headstart_foreground_wait_on_background_seconds_count"][()]
        assert fg == sum(paths.values())
        assert after["headstart_data_entries_total"][(("event", "ingested"),)] == 1
        assert after["headstart_query_evaluations_total"][()] >= 1
        c.delete("/v1/sessions/d")
        assert scrape(c.get("/metrics").text)["headstart_sessions"][()] == 1
        # every metric the sessions-API document lists is served (the fixed threshold's only with one)
        docs = (Path(__file__).parent.parent / "docs" / "sessions-api.md").read_text().split("## Metrics")[1]
        named = set(re.findall(r"`(headstart_\w+)", docs)) - {"headstart_gate_fixed_threshold"}
        served = {re.sub(r"_(count|sum|bucket|created)$", "", name) for name in after}
        assert named and not named - served, sorted(named - served)
