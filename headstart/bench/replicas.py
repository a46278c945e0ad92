"""``headstart bench --replicas N --db postgresql://...``: the agent workload through Ray
Serve's proxy with session affinity against the same requests routed at random, and the
cost the proxy adds per request over a single ``headstart serve``, in one run.

Routing is what differs, so both routings run the same exact engine (no pre-positioning,
no gate, no idle gaps) on the same model, one after the other, each on fresh replicas and
fresh session ids. TTFT is measured at the client, from sending the request to its first
streamed content. The proxy's cost is the client's end-to-end time minus the time the
server itself reports (``headstart.e2e_ms``) for the same one-token one-off requests,
through the proxy and straight to one server; the difference of the two medians is what
the proxy adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from headstart.bench.serverproc import ServeProcess, free_port
from headstart.bench.workloads import Script, Workload, make_workload


def add_replica_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None,
                   help="instead of the modes: replicas on Ray Serve, affinity against random routing "
                        "(needs --db postgresql://...)")
    p.add_argument("--db", default=None, help="the PostgreSQL store the replicas share (with --replicas)")
    p.add_argument("--overhead-requests", type=int, default=40,
                   help="one-token requests per side for the proxy overhead (with --replicas)")


@dataclass
class Turn:
    ttft_ms: float
    e2e_ms: float
    prompt_tokens: int
    cached_tokens: int
    path: str
    replica: str


@dataclass
class Routing:
    name: str
    turns: list[Turn] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ttft = sorted(t.ttft_ms for t in self.turns)
        later = [t for t in self.turns if t.path != "cold" or t.cached_tokens]
        return {
            "routing": self.name,
            "requests": len(self.turns),
            "ttft_p50_ms": round(statistics.median(ttft), 1),
            "ttft_p90_ms": round(ttft[int(0.9 * (len(ttft) - 1))], 1),
            "cached_tokens": sum(t.cached_tokens for t in self.turns),
            "prompt_tokens": sum(t.prompt_tokens for t in self.turns),
            "cached_share": round(sum(t.cached_tokens for t in self.turns) / max(1, sum(t.prompt_tokens
                                                                                      for t in self.turns)), 3),
            "warm_turns": len(later),
            "paths": {p: sum(1 for t in self.turns if t.path == p) for p in sorted({t.path for t in self.turns})},
        }


def _stream_turn(client: httpx.Client, url: str, sid: str, messages: list[dict[str, Any]], max_tokens: int,
                 ) -> tuple[str, Turn]:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    text, last = "", None
    with client.stream("POST", url + "/v1/chat/completions", json=body, headers={"x-session-id": sid}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode()}")
        replica = r.headers.get("x-headstart-replica", "")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                text += chunk["choices"][0]["delta"]["content"]
            if "headstart" in chunk:
                last = chunk
    done = time.perf_counter()
    assert last is not None, "the stream ended without its final chunk"
    usage = last["usage"]
    return text, Turn((first or done) - sent, done - sent, usage["prompt_tokens"],
                      usage["prompt_tokens_details"]["cached_tokens"], last["headstart"]["path"], replica)


def drive(url: str, workload: Workload, name: str, clients: int) -> Routing:
    """Every session of the workload through ``url``, ``clients`` sessions at a time, under
    session ids of their own (each routing starts from sessions no replica has seen)."""
    routing = Routing(name)
    prefix = f"{name}-{time.time_ns()}"
    lock = threading.Lock()
    queue = list(workload.sessions)

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    script: Script = queue.pop(0)
                messages: list[dict[str, Any]] = [{"role": "system", "content": script.system}] if script.system else []
                for step in script.steps:
                    messages += [dict(m) for m in step.messages]
                    text, turn = _stream_turn(http, url, f"{prefix}-{script.id}", messages, step.max_tokens)
                    turn.ttft_ms *= 1000
                    turn.e2e_ms *= 1000
                    with lock:
                        routing.turns.append(turn)
                    messages.append({"role": "assistant", "content": text})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return routing


def overhead(urls: dict[str, str], n: int) -> dict[str, dict[str, float]]:
    """Client end-to-end minus the server's own time, for one-token one-off requests (ms),
    alternating between the servers so that a busy spell of the machine hits both alike."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    gaps: dict[str, list[float]] = {name: [] for name in urls}
    e2e: dict[str, list[float]] = {name: [] for name in urls}
    with httpx.Client(timeout=120) as http:
        for i in range(n + 3):
            for name, url in urls.items():
                sent = time.perf_counter()
                r = http.post(url + "/v1/chat/completions", json=body)
                took = (time.perf_counter() - sent) * 1000
                r.raise_for_status()
                if i >= 3:  # the first few warm connections and code paths
                    gaps[name].append(took - r.json()["headstart"]["e2e_ms"])
                    e2e[name].append(took)
    return {name: {"p50_ms": statistics.median(gaps[name]), "client_e2e_p50_ms": statistics.median(e2e[name])}
            for name in urls}


def run_replica_bench(args: argparse.Namespace) -> int:
    from ray import serve

    from headstart.scaleout.app import build_app
    from headstart.scaleout.run import deploy, start_ray

    if not (args.db or "").startswith(("postgresql://", "postgres://")):
        print("headstart bench: --replicas needs --db postgresql://USER@HOST/DB", file=sys.stderr)
        return 2
    workload = make_workload("agent", seed=args.seed, quick=args.quick, sessions=args.sessions, turns=args.turns,
                             max_tokens=args.max_tokens, gaps="fixed:0")
    clients = args.clients[0] if args.clients else 2  # one count (a sweep is the in-process bench's)
    model = ["--model", args.model] if args.model else []
    flags = {"db": args.db, "replicas": args.replicas, "replica_cpus": 0, "no_pre_position": True,
             "no_gate": True, "spill": "off", **({"model": args.model} if args.model else {})}

    # One server on its own: the baseline the proxy's cost is measured against.
    data = tempfile.TemporaryDirectory()
    single = ServeProcess(Path(data.name), "--no-pre-position", "--no-gate", *model, db="", threads=None, timeout=300)
    single_url = single.url
    results: list[Routing] = []
    try:
        start_ray(None)
        for name, affinity in (("affinity", True), ("random", False)):
            serve.shutdown()  # a fresh proxy and replicas for each routing
            url = f"http://127.0.0.1:{free_port()}"
            deploy(build_app({**flags, "no_affinity": not affinity}), "127.0.0.1", int(url.rsplit(":", 1)[1]))
            results.append(drive(url, workload, name, clients))
            if affinity:
                cost = overhead({"single": single_url, "proxy": url}, args.overhead_requests)
    finally:
        serve.shutdown()
        single.stop()
        data.cleanup()
    direct, proxied = cost["single"], cost["proxy"]
    report = {
        "workload": workload.describe(),
        "replicas": args.replicas,
        "clients": clients,
        "routing": [r.summary() for r in results],
        "proxy_overhead_ms": {
            "single_server_p50": round(direct["p50_ms"], 2),
            "serve_proxy_p50": round(proxied["p50_ms"], 2),
            "added_p50": round(proxied["p50_ms"] - direct["p50_ms"], 2),
            "single_server_e2e_p50": round(direct["client_e2e_p50_ms"], 1),
            "serve_proxy_e2e_p50": round(proxied["client_e2e_p50_ms"], 1),
        },
    }
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def markdown(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"agent workload: {w['sessions']} sessions, {w['requests']} requests, {report['replicas']} replicas, "
        f"{report['clients']} clients",
        "",
        "| routing | requests | TTFT p50 (ms) | TTFT p90 (ms) | cached tokens | cached share of prompt | paths |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["routing"]:
        paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items())
        lines.append(f"| {r['routing']} | {r['requests']} | {r['ttft_p50_ms']} | {r['ttft_p90_ms']} | "
                     f"{r['cached_tokens']} | {r['cached_share']:.0%} | {paths} |")
    o = report["proxy_overhead_ms"]
    lines += [
        "",
        "| per request (one-token one-off) | single `headstart serve` | through the Serve proxy | added |",
        "|---|---|---|---|",
        f"| client time minus server time, p50 (ms) | {o['single_server_p50']} | {o['serve_proxy_p50']} | "
        f"{o['added_p50']} |",
        f"| client end-to-end, p50 (ms) | {o['single_server_e2e_p50']} | {o['serve_proxy_e2e_p50']} | |",
    ]
    return "\n".join(lines)
