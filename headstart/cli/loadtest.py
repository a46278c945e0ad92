"""``headstart load``: a bounded load test against a running server on loopback.

A fixed number of clients, each owning its sessions, send chat turns (alternately
streamed and not) for a fixed time, with the whole conversation every turn as real
clients do. Each client keeps the transcript it was acknowledged; at the end the
server's own count of turns per session is compared with it, so a lost turn shows.
With ``turns_per_session`` a client starts a fresh session after that many turns, so a
conversation never outgrows the server's KV budget or context. Any answer but 200 (a
refusal as much as a server error) fails the run: a bounded load has none to expect.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from headstart.stats import percentile

TOPICS = ["the sea", "mountains", "bread", "trains", "music", "rain", "bees", "chess"]


@dataclass
class LoadReport:
    """What the run saw; ``ok`` is the verdict the test and the CLI use."""

    requests: int = 0
    completed: int = 0
    status: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    acknowledged: dict[str, int] = field(default_factory=dict)
    server_turns: dict[str, int] = field(default_factory=dict)
    # What each session's client was acknowledged: the conversation it will send next.
    transcripts: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.status.items() if code >= 500)

    @property
    def refused(self) -> int:
        """Requests answered with a 4xx (busy, over a limit, a turn too long for the budget)."""
        return sum(n for code, n in self.status.items() if 400 <= code < 500)

    @property
    def lost_turns(self) -> int:
        return sum(max(0, n - self.server_turns.get(sid, 0)) for sid, n in self.acknowledged.items())

    @property
    def ok(self) -> bool:
        answered = sum(self.status.values())
        return (
            self.status.get(200, 0) == answered == self.requests
            and self.transport_errors == 0
            and self.lost_turns == 0
        )

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "status": self.status,
            "server_errors": self.server_errors,
            "refused": self.refused,
            "transport_errors": self.transport_errors,
            "lost_turns": self.lost_turns,
            "ttft_ms_p50": percentile(self.ttft_ms, 50),
            "ttft_ms_p99": percentile(self.ttft_ms, 99),
            "e2e_ms_p50": percentile(self.e2e_ms, 50),
            "throughput_rps": self.completed / self.seconds if self.seconds else 0.0,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
        }


async def _turn(
    client: httpx.AsyncClient, sid: str, messages: list[dict[str, str]], max_tokens: int, stream: bool,
    report: LoadReport,
) -> str | None:
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"x-session-id": sid}
    report.requests += 1
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        report.status[r.status_code] = report.status.get(r.status_code, 0) + 1
        if r.status_code != 200:
            return None
        data = r.json()
        report.ttft_ms.append(data["headstart"]["ttft_ms"])
        report.e2e_ms.append(data["headstart"]["e2e_ms"])
        report.tokens += data["usage"]["completion_tokens"]
        return data["choices"][0]["message"]["content"]
    text, extension, tokens = "", None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        report.status[r.status_code] = report.status.get(r.status_code, 0) + 1
        if r.status_code != 200:
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                report.status[500] = report.status.get(500, 0) + 1
                return None
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
            extension = chunk.get("headstart", extension)
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    if extension is None:
        return None
    report.ttft_ms.append(extension["ttft_ms"])
    report.e2e_ms.append(extension["e2e_ms"])
    report.tokens += tokens
    return text


async def _client(
    client: httpx.AsyncClient, index: int, sessions: list[str], deadline: float, max_tokens: int,
    think_s: float, report: LoadReport, seed: int, turns_per_session: int | None, turns: int | None,
) -> None:
    rng = random.Random(seed + index)
    transcripts = report.transcripts
    generation = dict.fromkeys(sessions, 0)
    turn = 0
    while time.monotonic() < deadline and (turns is None or turn < turns):
        slot = sessions[turn % len(sessions)]
        sid = f"{slot}-{generation[slot]}"
        if turns_per_session is not None and report.acknowledged.get(sid, 0) >= turns_per_session:
            generation[slot] += 1  # a fresh conversation: the old one is long enough
            sid = f"{slot}-{generation[slot]}"
        messages = transcripts.setdefault(sid, [])
        question = f"Tell me one short fact about {rng.choice(TOPICS)}."
        attempt = [*messages, {"role": "user", "content": question}]
        try:
            answer = await _turn(client, sid, attempt, max_tokens, stream=turn % 2 == 1, report=report)
        except httpx.HTTPError:
            report.transport_errors += 1
            answer = None
        if answer is not None:
            transcripts[sid] = [*attempt, {"role": "assistant", "content": answer}]
            report.acknowledged[sid] = report.acknowledged.get(sid, 0) + 1
            report.completed += 1
        turn += 1
        await asyncio.sleep(rng.uniform(0, think_s))


async def run_load(
    url: str,
    clients: int = 4,
    sessions_per_client: int = 2,
    seconds: float = 20.0,
    max_tokens: int = 8,
    think_s: float = 0.5,
    api_key: str | None = None,
    seed: int = 0,
    turns_per_session: int | None = None,
    turns: int | None = None,
) -> LoadReport:
    """Drive the server for ``seconds`` (or until each client has sent ``turns`` turns);
    then read each session's turn count back."""
    report = LoadReport()
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    prefix = f"load{seed}"
    started = time.monotonic()
    deadline = started + seconds
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        await asyncio.gather(
            *(
                _client(
                    client, i, [f"{prefix}-c{i}-s{j}" for j in range(sessions_per_client)], deadline,
                    max_tokens, think_s, report, seed, turns_per_session, turns,
                )
                for i in range(clients)
            )
        )
        report.seconds = time.monotonic() - started
        for sid in report.acknowledged:
            r = await client.get(f"/v1/sessions/{sid}")
            report.server_turns[sid] = r.json().get("turns", 0) if r.status_code == 200 else 0
    return report
