"""``headstart bench --replicas N --db postgresql://...``: the agent workload through Ray
Serve's proxy with session affinity against the same requests routed at random, and the
cost the proxy adds per request over a single ``headstart serve``, in one run.

Routing is what differs, so both routings run the same exact engine (no pre-positioning,
no gate, no idle gaps) on the same model, one after the other, each on fresh replicas and
fresh session ids. TTFT is measured at the client, from sending the request to its first
streamed content.

The proxy's cost is measured side by side: the same small requests, alternating, straight
to one ``headstart serve`` and through Serve's proxy to the replicas (a 1-token chat turn
on a session that exists on both, and ``GET /v1/models``), and, to tell Serve's own cost
from headstart's, a trivial ASGI app (a fixed answer, :func:`floor_app`) straight under
uvicorn and as a Serve application beside headstart's, routed by the same router. Each
probe reports the client's p50/p99 on both sides and the difference of the medians, and
the CPU time each process group spent per request (its CPU over the probe minus its idle
rate): on a shared machine the wall-clock numbers wait for a core, the CPU numbers much
less so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from headstart.bench.clients import run_threads
from headstart.bench.serverproc import ServeProcess, free_port, wait_healthy
from headstart.bench.workloads import Script, Workload, make_workload


def add_replica_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None,
                   help="instead of the modes: replicas on Ray Serve, affinity against random routing "
                        "(needs --db postgresql://...)")
    p.add_argument("--db", default=None, help="the PostgreSQL store the replicas share (with --replicas)")
    p.add_argument("--overhead-requests", type=int, default=60,
                   help="requests per side and probe for the proxy overhead (with --replicas; at least 50)")


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

    run_threads([client] * clients)
    return routing


FLOOR_BODY = json.dumps({"object": "list", "data": []}).encode()
FLOOR_PREFIX = "/floor"

Scope = MutableMapping[str, Any]


async def floor_app(scope: Scope, receive: Callable[[], Awaitable[Any]],
                    send: Callable[[Any], Awaitable[None]]) -> None:
    """A fixed JSON answer after reading the body: what any ASGI app costs at least, so
    the same app straight and through Serve measures Serve's own share of the proxy cost."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(FLOOR_BODY)).encode())]})
    await send({"type": "http.response.body", "body": FLOOR_BODY})


def floor_deployment(replicas: int) -> Any:
    """:func:`floor_app` as a Serve application of ``replicas`` replicas, with the
    deployment settings and router that headstart's replicas have."""
    from ray import serve

    from headstart.scaleout.app import deployment_options
    from headstart.scaleout.options import ReplicaOptions

    @serve.ingress()
    class Floor:
        def __serve_build_asgi_app__(self) -> Any:
            return floor_app

    opts = ReplicaOptions(replicas=replicas, cpus=0, gpus=0)
    return serve.deployment(Floor, name="Floor").options(**deployment_options(opts)).bind()


@dataclass
class Probe:
    """One kind of small request, sent alternately to ``direct`` and ``proxied``."""

    name: str
    method: str
    path: str
    direct: str
    proxied: str
    chat: bool = False


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:  # a process that ended meanwhile
            continue
        total += t.user + t.system
    return total


def ray_process_groups(exclude: set[int]) -> dict[str, list[int]]:
    """This process's Ray children by role: Serve's proxy, headstart's replicas, the
    floor app's replicas, and the rest of Ray (raylet, GCS, controller, agents)."""
    import psutil

    groups: dict[str, list[int]] = {"serve proxy": [], "headstart replicas": [], "floor replicas": [],
                                    "rest of Ray": []}
    for child in psutil.Process().children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "ProxyActor" in title:
            groups["serve proxy"].append(child.pid)
        elif "ServeReplica:floor" in title:
            groups["floor replicas"].append(child.pid)
        elif "ServeReplica" in title:
            groups["headstart replicas"].append(child.pid)
        else:
            groups["rest of Ray"].append(child.pid)
    return groups


def _idle_rates(cpu_groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """The CPU each group spends per second with no request (Ray's own timers, polls)."""
    began, cpu = time.perf_counter(), {g: _cpu_seconds(p) for g, p in cpu_groups.items()}
    time.sleep(seconds)
    return {g: (_cpu_seconds(p) - cpu[g]) / (time.perf_counter() - began) for g, p in cpu_groups.items()}


def overhead(probes: list[Probe], n: int, cpu_groups: dict[str, list[int]], idle_s: float = 8.0,
             ) -> list[dict[str, Any]]:
    """Each probe ``n`` times per side (after a few warm-up requests), alternating between
    the sides so that a busy spell of the machine hits both alike: the client's time, and
    for chat also the client's time minus the server's own (``headstart.e2e_ms``)."""
    results = []
    with httpx.Client(timeout=120) as http:
        for probe in probes:
            idle_rate = _idle_rates(cpu_groups, idle_s)
            times: dict[str, list[float]] = {"direct": [], "proxied": []}
            gaps: dict[str, list[float]] = {"direct": [], "proxied": []}
            conversations: dict[str, list[dict[str, str]]] = {"direct": [], "proxied": []}
            sid = f"overhead-{time.time_ns()}"
            warm = 3
            for i in range(warm + n):
                if i == warm:
                    began, cpu = time.perf_counter(), {g: _cpu_seconds(p) for g, p in cpu_groups.items()}
                for side in ("direct", "proxied"):
                    url = (probe.direct if side == "direct" else probe.proxied) + probe.path
                    body, headers = None, {}
                    if probe.chat:  # the session's next 1-token turn
                        conversations[side].append({"role": "user", "content": "Hi"})
                        body = {"messages": conversations[side], "max_tokens": 1, "temperature": 0}
                        headers = {"x-session-id": sid}
                    sent = time.perf_counter()
                    r = http.request(probe.method, url, json=body, headers=headers)
                    took = (time.perf_counter() - sent) * 1000
                    if r.status_code != 200:
                        raise RuntimeError(f"{probe.name} {side}: {r.status_code} {r.text}")
                    if probe.chat:
                        answer = r.json()
                        conversations[side].append({"role": "assistant",
                                                    "content": answer["choices"][0]["message"]["content"]})
                    if i >= warm:
                        times[side].append(took)
                        if probe.chat:
                            gaps[side].append(took - answer["headstart"]["e2e_ms"])
            spent = time.perf_counter() - began
            cpu_ms = {g: round((_cpu_seconds(p) - cpu[g] - idle_rate[g] * spent) * 1000 / n, 2)
                      for g, p in cpu_groups.items()}
            row: dict[str, Any] = {"probe": probe.name, "requests": n}
            for side in ("direct", "proxied"):
                row[f"{side}_p50_ms"] = round(statistics.median(times[side]), 2)
                row[f"{side}_p99_ms"] = round(_pct(times[side], 0.99), 2)
            row["added_p50_ms"] = round(row["proxied_p50_ms"] - row["direct_p50_ms"], 2)
            if probe.chat:
                row["added_p50_minus_server_ms"] = round(statistics.median(gaps["proxied"])
                                                         - statistics.median(gaps["direct"]), 2)
            row["cpu_ms_per_request"] = cpu_ms
            results.append(row)
    return results


def _uptime() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def run_replica_bench(args: argparse.Namespace) -> int:
    from ray import serve

    from headstart.scaleout.app import build_app
    from headstart.scaleout.run import deploy, start_ray

    if not (args.db or "").startswith(("postgresql://", "postgres://")):
        print("headstart bench: --replicas needs --db postgresql://USER@HOST/DB", file=sys.stderr)
        return 2
    if args.overhead_requests < 50:
        print("headstart bench: --overhead-requests must be at least 50 (a p99 of fewer is one request)",
              file=sys.stderr)
        return 2
    workload = make_workload("agent", seed=args.seed, quick=args.quick, sessions=args.sessions, turns=args.turns,
                             max_tokens=args.max_tokens, gaps="fixed:0")
    clients = args.clients[0] if args.clients else 2  # one count (a sweep is the in-process bench's)
    model = ["--model", args.model] if args.model else []
    flags = {"db": args.db, "replicas": args.replicas, "replica_cpus": 0, "no_pre_position": True,
             "no_gate": True, "spill": "off", **({"model": args.model} if args.model else {})}

    # The baselines the proxy's cost is measured against: one server on its own (with the
    # same store as the replicas, so that a turn's write costs the same on both sides, and
    # one torch thread, as Ray gives a replica that reserves no CPU), and the floor app
    # under uvicorn.
    data = tempfile.TemporaryDirectory()
    single = ServeProcess(Path(data.name), "--no-pre-position", "--no-gate", "--spill", "off", *model, db=args.db,
                          threads=1, timeout=300)
    floor_port = free_port()
    floor = subprocess.Popen([sys.executable, "-m", "uvicorn", "headstart.bench.replicas:floor_app", "--host",
                              "127.0.0.1", "--port", str(floor_port), "--log-level", "warning"])
    floor_url = f"http://127.0.0.1:{floor_port}"
    results: list[Routing] = []
    load: dict[str, str] = {}
    try:
        wait_healthy(floor_url, floor, timeout=120, path="/")
        start_ray(None)
        for name, affinity in (("affinity", True), ("random", False)):
            serve.shutdown()  # a fresh proxy and replicas for each routing
            url = f"http://127.0.0.1:{free_port()}"
            deploy(build_app({**flags, "no_affinity": not affinity}), "127.0.0.1", int(url.rsplit(":", 1)[1]))
            results.append(drive(url, workload, name, clients))
            if affinity:
                serve.run(floor_deployment(args.replicas), name="floor", route_prefix=FLOOR_PREFIX)
                groups = {"single headstart serve": [single.proc.pid], "floor under uvicorn": [floor.pid],
                          **ray_process_groups({single.proc.pid, floor.pid})}
                probes = [
                    Probe("chat, 1 token, existing session", "POST", "/v1/chat/completions", single.url, url,
                          chat=True),
                    Probe("GET /v1/models", "GET", "/v1/models", single.url, url),
                    Probe("floor app, POST with a body", "POST", "", floor_url, url + FLOOR_PREFIX),
                    Probe("floor app, GET", "GET", "", floor_url, url + FLOOR_PREFIX),
                ]
                load["before"] = _uptime()
                cost = overhead(probes, args.overhead_requests, groups)
                load["after"] = _uptime()
                serve.delete("floor")
    finally:
        serve.shutdown()
        floor.terminate()
        floor.wait(30)
        single.stop()
        data.cleanup()
    report = {
        "workload": workload.describe(),
        "replicas": args.replicas,
        "clients": clients,
        "routing": [r.summary() for r in results],
        "proxy_overhead": cost,
        "load": load,
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
    rows = report["proxy_overhead"]
    lines += [
        "",
        f"proxy overhead, {rows[0]['requests']} requests per side and probe, alternating "
        f"({report['load']['before']} before, {report['load']['after']} after):",
        "",
        "| probe | direct p50 / p99 (ms) | through Serve p50 / p99 (ms) | added p50 (ms) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        added = f"{r['added_p50_ms']}"
        if "added_p50_minus_server_ms" in r:
            added += f" ({r['added_p50_minus_server_ms']} without the server's own time)"
        lines.append(f"| {r['probe']} | {r['direct_p50_ms']} / {r['direct_p99_ms']} | "
                     f"{r['proxied_p50_ms']} / {r['proxied_p99_ms']} | {added} |")
    groups = list(rows[0]["cpu_ms_per_request"])
    lines += [
        "",
        "CPU per request (ms, each process group's CPU over the probe minus its idle rate, measured just "
        "before; a small negative number is that rate's noise):",
        "",
        "| probe | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for r in rows:
        lines.append(f"| {r['probe']} | " + " | ".join(str(r["cpu_ms_per_request"][g]) for g in groups) + " |")
    return "\n".join(lines)
