"""``headstart bench --clients 1,2,4,8``: the same requests at several client counts.

One model load; for each client count a fresh engine and the same sessions and turns,
split round-robin over that many client threads that send their next turn as soon as the
last one is answered (busy clients, no think time). Per count: aggregate output tokens/s,
TTFT p50/p99 by path, end-to-end p50/p99, the step-duration distribution and the idle-time
tokens per step. Then two probes of the step order: an ``entry`` turn while another session
prefills a 2,000-token prompt cold (against the same turn on an idle server), and gate and
``ready_exact`` first tokens while 8 clients keep the loop busy (against the step duration).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.engine.output import Completion
from headstart.model.backend import Backend
from headstart.stats import percentile

TOPICS = ["rivers", "mountains", "bread", "bicycles", "owls", "glass", "tides", "maps", "bees", "clocks"]
FOLLOW_UPS = ["Tell me one more fact about that.", "Why does that matter?", "Summarise it in one line."]


def _turns(sessions: int, turns: int) -> list[list[str]]:
    return [[f"Tell me about {TOPICS[i % len(TOPICS)]} in a few sentences.", *FOLLOW_UPS[: turns - 1]]
            for i in range(sessions)]


def _converse(engine: Engine, sid: str, questions: list[str], params: SamplingParams, out: list[Completion]) -> None:
    messages: list[dict[str, Any]] = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        c = engine.generate(Request(messages=list(messages), params=params, session_id=sid, stream=True))
        out.append(c)
        messages.append({"role": "assistant", "content": c.text})


def _summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def run_clients(backend: Backend, config: EngineConfig, clients: int, sessions: int, turns: int,
                max_tokens: int) -> dict[str, Any]:
    """The sweep's workload at ``clients`` busy clients on a fresh engine."""
    engine = Engine(backend, config=config).start()
    params = SamplingParams(max_tokens=max_tokens)
    scripts = _turns(sessions, turns)
    done: list[Completion] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        mine: list[Completion] = []
        for i in range(k, sessions, clients):
            _converse(engine, f"s{i}", scripts[i], params, mine)
        with lock:
            done.extend(mine)

    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        engine.wait_idle(600)
        steps = engine.stats.snapshot()["steps"]
    finally:
        engine.stop()
    tokens = sum(c.completion_tokens for c in done)
    paths = sorted({c.path for c in done})
    return {
        "clients": clients,
        "requests": len(done),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms": {p: _summary([c.ttft_ms for c in done if c.path == p]) | {"n": sum(c.path == p for c in done)}
                    for p in paths},
        "ttft_all_ms": _summary([c.ttft_ms for c in done]),
        "e2e_ms": _summary([c.e2e_ms for c in done]),
        "background_wait_ms_max": max((c.background_wait_ms for c in done), default=0.0),
        "step_ms": steps["duration_ms"],
        "step_sequences": steps["sequences"],
        "step_tokens": steps["tokens"],
        "background_tokens_per_step": steps["background_tokens"]["mean"],
        "background_budget_share": steps["background_budget_share"]["mean"],
        "max_sequences": steps["max_sequences"],
    }


def _entry_turn(engine: Engine, sid: str) -> list[dict[str, Any]]:
    """A first turn on ``sid`` and its idle work (the entry is prefilled); the next turn's messages."""
    first = [{"role": "user", "content": "Name a colour."}]
    c = engine.generate(Request(messages=first, params=SamplingParams(max_tokens=8), session_id=sid))
    engine.wait_idle(600)
    return [*first, {"role": "assistant", "content": c.text}, {"role": "user", "content": "And another one?"}]


def entry_beside_cold_prefill(backend: Backend, config: EngineConfig, prompt_tokens: int) -> dict[str, Any]:
    """TTFT of an entry-path turn on an idle server, and while another session prefills
    ``prompt_tokens`` cold."""
    engine = Engine(backend, config=config).start()
    params = SamplingParams(max_tokens=4)
    try:
        idle_msgs = _entry_turn(engine, "idle")
        idle = engine.generate(Request(messages=idle_msgs, params=params, session_id="idle", gate=False))
        busy_msgs = _entry_turn(engine, "busy")
        filler = " ".join(f"item {i} is on the shelf." for i in range(prompt_tokens))
        ids = engine.template.encode(filler)[:prompt_tokens]
        text = engine.template.tokenizer.decode(ids)
        big = engine.submit(Request(messages=[{"role": "user", "content": text}], params=params, session_id="big"))
        while engine.stats.snapshot()["steps"]["n"] < 2:  # the cold prefill is under way
            time.sleep(0.001)
        mark = engine.stats.snapshot()["steps"]["n"]
        busy = engine.generate(Request(messages=busy_msgs, params=params, session_id="busy", gate=False))
        cold = big.result()
        with engine.stats.lock:
            during = list(engine.stats.step_ms)[mark:]
    finally:
        engine.stop()
    return {
        "prompt_tokens": cold.prompt_tokens,
        "paths": [idle.path, busy.path],
        "idle_ttft_ms": idle.ttft_ms,
        "busy_ttft_ms": busy.ttft_ms,
        "step_ms_p50": percentile(during, 50),
        "cold_ttft_ms": cold.ttft_ms,
    }


def hits_while_busy(backend: Backend, config: EngineConfig, clients: int, probes: int) -> dict[str, Any]:
    """Gate and ready_exact TTFT while ``clients`` busy clients decode, beside the step duration."""
    from headstart.engine import sessions as sessionapi

    engine = Engine(backend, config=config).start()
    stop = threading.Event()
    long = SamplingParams(max_tokens=64)

    def busy(k: int) -> None:
        while not stop.is_set():
            engine.generate(Request(messages=[{"role": "user", "content": f"Write about {TOPICS[k]}."}],
                                    params=long))

    ttft: dict[str, list[float]] = {"gate": [], "ready_exact": []}
    try:
        nxt = {}
        for i in range(probes):  # sessions pre-positioned before the load starts
            nxt[i] = _entry_turn(engine, f"g{i}")
        threads = [threading.Thread(target=busy, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        mark = engine.stats.snapshot()["steps"]["n"]
        for i in range(probes):
            c = engine.generate(Request(messages=nxt[i], params=SamplingParams(max_tokens=4), session_id=f"g{i}",
                                        stream=True, gap_threshold=0.0))  # a fixed gate: it fires on any gap
            ttft.setdefault(c.path, []).append(c.ttft_ms)
            s = engine.get_session(f"g{i}")
            msgs = [*nxt[i], {"role": "assistant", "content": c.text}, {"role": "user", "content": "Thanks."}]
            ticket = sessionapi.warm(engine, s, Request(messages=msgs, session_id=f"g{i}"))
            ticket.future.result(timeout=600)
            c = engine.generate(Request(messages=msgs, params=SamplingParams(max_tokens=4), session_id=f"g{i}"))
            ttft.setdefault(c.path, []).append(c.ttft_ms)
        with engine.stats.lock:
            during = list(engine.stats.step_ms)[mark:]
    finally:
        stop.set()
        engine.stop()
    return {
        "clients": clients,
        "ttft_ms": {p: _summary(v) | {"n": len(v)} for p, v in ttft.items() if v},
        "step_ms": _summary(during),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from headstart.bench.plots import _pyplot

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [r["clients"] for r in rows]
    a.plot(xs, [r["tokens_per_s"] for r in rows], marker="o")
    a.set(xlabel="clients", ylabel="output tokens/s", title="aggregate throughput", xticks=xs)
    b.plot(xs, [r["ttft_all_ms"]["p99"] for r in rows], marker="o", color="#d62728")
    b.set(xlabel="clients", ylabel="ms", title="TTFT p99 (all paths)", xticks=xs)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(report: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"

    base = report["sweep"][0]["tokens_per_s"]
    lines = [
        "| clients | output tok/s | vs 1 | TTFT p50 / p99 ms (by path) | e2e p50 / p99 ms | step ms p50 / p99 "
        "| seqs/step p50 | bg tokens/step | bg share of budget |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["sweep"]:
        by_path = "; ".join(f"{p} {f(v['p50'])} / {f(v['p99'])}" for p, v in r["ttft_ms"].items())
        lines.append(
            f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {by_path} "
            f"| {f(r['e2e_ms']['p50'])} / {f(r['e2e_ms']['p99'])} | {f(r['step_ms']['p50'])} / "
            f"{f(r['step_ms']['p99'])} | {f(r['step_sequences']['p50'])} | "
            f"{r['background_tokens_per_step'] or 0:.1f} | {100 * (r['background_budget_share'] or 0):.1f}% |"
        )
    e = report.get("entry")
    if e:
        lines += ["", f"entry turn TTFT: idle server {f(e['idle_ttft_ms'])} ms; while another session prefills "
                      f"{e['prompt_tokens']} tokens cold {f(e['busy_ttft_ms'])} ms (paths {e['paths']}); step p50 "
                      f"meanwhile {f(e['step_ms_p50'])} ms"]
    h = report.get("hits")
    if h:
        parts = "; ".join(f"{p} p50 {f(v['p50'])} / p99 {f(v['p99'])} ms (n={v['n']})" for p, v in h["ttft_ms"].items())
        lines += ["", f"with {h['clients']} busy clients: {parts}; step duration p50 {f(h['step_ms']['p50'])} / "
                      f"p99 {f(h['step_ms']['p99'])} ms"]
    lines += ["", f"peer: {report['peer']}"]
    return "\n".join(lines)


def run_sweep(args: Any, counts: list[int]) -> int:
    from headstart.bench import peer_llamacpp
    from headstart.bench.runner import warm_up
    from headstart.model import load

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend = load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    warm_up(backend)
    config = EngineConfig()
    if args.step_tokens:
        config = replace(config, step_tokens=args.step_tokens)
    sessions = args.sessions or max(counts)
    turns = args.turns or 2
    max_tokens = args.max_tokens or 32
    reason = peer_llamacpp.unavailable(args.peer_python)
    report: dict[str, Any] = {
        "model": getattr(backend, "name", None), "sessions": sessions, "turns": turns, "max_tokens": max_tokens,
        "step_tokens": config.step_tokens, "sweep": [],
        "peer": f"skipped: {reason}" if reason else "llama.cpp installed but not driven by the sweep yet",
    }
    for n in counts:
        print(f"sweep: {n} clients...", file=sys.stderr)
        report["sweep"].append(run_clients(backend, config, n, sessions, turns, max_tokens))
    if not args.quick:
        print("sweep: entry turn beside a cold prefill...", file=sys.stderr)
        report["entry"] = entry_beside_cold_prefill(backend, config, 2000)
        print("sweep: hits beside busy clients...", file=sys.stderr)
        report["hits"] = hits_while_busy(backend, config, max(counts), 5)
    print(markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.out:
        print(f"plot: {plot(report['sweep'], Path(args.out) / 'sweep.png')}", file=sys.stderr)
    return 0
