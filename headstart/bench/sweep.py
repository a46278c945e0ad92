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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from headstart.bench import peer_llamacpp
from headstart.bench.peer_llamacpp import LlamaCppServer, converse
from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.engine.output import Completion
from headstart.model.backend import Backend
from headstart.session.template import ChatTemplate
from headstart.stats import percentile

T = TypeVar("T")
PEER_LABEL = "llama.cpp"

TOPICS = ["rivers", "mountains", "bread", "bicycles", "owls", "glass", "tides", "maps", "bees", "clocks"]
FOLLOW_UPS = ["Tell me one more fact about that.", "Why does that matter?", "Summarise it in one line."]


def _turns(sessions: int, turns: int) -> list[list[str]]:
    return [[f"Tell me about {TOPICS[i % len(TOPICS)]} in a few sentences.", *FOLLOW_UPS[: turns - 1]]
            for i in range(sessions)]


def _converse(engine: Engine, sid: str, questions: list[str], params: SamplingParams) -> list[Completion]:
    messages: list[dict[str, Any]] = []
    out = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        c = engine.generate(Request(messages=list(messages), params=params, session_id=sid, stream=True))
        out.append(c)
        messages.append({"role": "assistant", "content": c.text})
    return out


def _summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def _busy(clients: int, sessions: int, session: Callable[[int], list[T]]) -> tuple[list[T], float]:
    """``session(i)`` for every session, split round-robin over ``clients`` threads that each start
    their next session as soon as the last is done: (every result, wall seconds)."""
    done: list[T] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            mine = [r for i in range(k, sessions, clients) for r in session(i)]
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            done.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return done, wall


def _row(clients: int, ttft: list[float], e2e: list[float], tokens: int, wall: float) -> dict[str, Any]:
    """What every server in the sweep reports at one client count."""
    return {"clients": clients, "requests": len(e2e), "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_all_ms": _summary(ttft), "e2e_ms": _summary(e2e)}


def run_clients(backend: Backend, config: EngineConfig, clients: int, sessions: int, turns: int,
                max_tokens: int) -> dict[str, Any]:
    """The sweep's workload at ``clients`` busy clients on a fresh engine."""
    engine = Engine(backend, config=config).start()
    params = SamplingParams(max_tokens=max_tokens)
    scripts = _turns(sessions, turns)

    try:
        done, wall = _busy(clients, sessions, lambda i: _converse(engine, f"s{i}", scripts[i], params))
        engine.wait_idle(600)
        steps = engine.stats.snapshot()["steps"]
    finally:
        engine.stop()
    paths = sorted({c.path for c in done})
    return _row(clients, [c.ttft_ms for c in done], [c.e2e_ms for c in done],
                sum(c.completion_tokens for c in done), wall) | {
        "ttft_ms": {p: _summary([c.ttft_ms for c in done if c.path == p]) | {"n": sum(c.path == p for c in done)}
                    for p in paths},
        "background_wait_ms_max": max((c.background_wait_ms for c in done), default=0.0),
        "step_ms": steps["duration_ms"],
        "step_sequences": steps["sequences"],
        "step_tokens": steps["tokens"],
        "background_tokens_per_step": steps["background_tokens"]["mean"],
        "background_budget_share": steps["background_budget_share"]["mean"],
        "max_sequences": steps["max_sequences"],
    }


def peer_clients(server: LlamaCppServer, template: ChatTemplate, clients: int, sessions: int, turns: int,
                 max_tokens: int) -> dict[str, Any]:
    """The same requests against the llama.cpp server, over HTTP, with the same busy clients."""
    scripts = _turns(sessions, turns)
    done, wall = _busy(clients, sessions, lambda i: converse(server, template, scripts[i], max_tokens))
    return _row(clients, [t for t, _, _ in done], [e for _, e, _ in done], sum(n for _, _, n in done), wall)


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


def series(report: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per server in the sweep: client counts, output tokens/s and TTFT p99, what the plot draws."""
    out = {}
    for name, rows in (("headstart", report["sweep"]), (PEER_LABEL, report.get("peer_sweep") or [])):
        if rows:
            out[name] = {"clients": [r["clients"] for r in rows], "tokens_per_s": [r["tokens_per_s"] for r in rows],
                         "ttft_p99_ms": [r["ttft_all_ms"]["p99"] for r in rows]}
    return out


def plot(report: dict[str, Any], path: Path) -> Path:
    from headstart.bench.plots import COLORS, _pyplot

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = {"headstart": COLORS["gate"], PEER_LABEL: COLORS[peer_llamacpp.NAME]}
    for name, s in series(report).items():
        a.plot(s["clients"], s["tokens_per_s"], marker="o", label=name, color=colors[name])
        b.plot(s["clients"], s["ttft_p99_ms"], marker="o", label=name, color=colors[name])
    xs = [r["clients"] for r in report["sweep"]]
    a.set(xlabel="clients", ylabel="output tokens/s", title="aggregate throughput", xticks=xs)
    b.set(xlabel="clients", ylabel="ms", title="TTFT p99 (all paths)", xticks=xs)
    a.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def side_by_side(report: dict[str, Any]) -> list[str]:
    """The table with a column per server at each client count (empty without the peer's rows)."""
    peer = {r["clients"]: r for r in report.get("peer_sweep") or []}
    if not peer:
        return []

    def pair(r: dict[str, Any], key: str) -> str:
        return f"{_f(r[key]['p50'])} / {_f(r[key]['p99'])}"

    lines = [f"| clients | output tok/s headstart (vs 1) | output tok/s {PEER_LABEL} (vs 1) | {PEER_LABEL} / headstart "
             f"| TTFT p50 / p99 ms headstart | TTFT p50 / p99 ms {PEER_LABEL} | e2e p50 / p99 ms headstart "
             f"| e2e p50 / p99 ms {PEER_LABEL} |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    ours, theirs = report["sweep"][0]["tokens_per_s"], report["peer_sweep"][0]["tokens_per_s"]
    for r in report["sweep"]:
        q = peer[r["clients"]]
        lines.append(
            f"| {r['clients']} | {r['tokens_per_s']:.1f} ({r['tokens_per_s'] / ours:.2f}x) "
            f"| {q['tokens_per_s']:.1f} ({q['tokens_per_s'] / theirs:.2f}x) "
            f"| {q['tokens_per_s'] / r['tokens_per_s']:.2f} | {pair(r, 'ttft_all_ms')} | {pair(q, 'ttft_all_ms')} "
            f"| {pair(r, 'e2e_ms')} | {pair(q, 'e2e_ms')} |"
        )
    return lines


def markdown(report: dict[str, Any]) -> str:
    f = _f
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
    if table := side_by_side(report):
        lines += ["", *table]
    return "\n".join(lines)


def _peer_gguf(args: Any) -> tuple[Path | None, str]:
    """The GGUF the peer serves, or None and why it is skipped."""
    from headstart.model.loader import resolve

    reason = peer_llamacpp.unavailable(args.peer_python)
    if reason is None:
        source = resolve(args.model, args.cache_dir)
        if source.is_gguf:
            return source.path / str(source.gguf_file), ""
        reason = "the model is not a GGUF file"
    return None, f"skipped: {reason}. To run it: {peer_llamacpp.INSTALL_HINT}"


def run_sweep(args: Any, counts: list[int]) -> int:
    import torch

    from headstart.bench.runner import warm_up
    from headstart.model import load

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir)
    warm_up(backend)
    config = EngineConfig(attention=args.attention, linear=args.linear)
    if args.step_tokens:
        config = replace(config, step_tokens=args.step_tokens)
    sessions = args.sessions or max(counts)
    turns = args.turns or 2
    max_tokens = args.max_tokens or 32
    gguf, skipped = _peer_gguf(args)
    threads = torch.get_num_threads()
    report: dict[str, Any] = {
        "model": getattr(backend, "name", None), "sessions": sessions, "turns": turns, "max_tokens": max_tokens,
        "step_tokens": config.step_tokens, "sweep": [], "peer_sweep": [], "peer": skipped,
    }
    template = ChatTemplate(backend.tokenizer)  # type: ignore[attr-defined]
    for n in counts:
        print(f"sweep: {n} clients...", file=sys.stderr)
        report["sweep"].append(run_clients(backend, config, n, sessions, turns, max_tokens))
        if gguf is not None:
            print(f"sweep: {n} clients, {PEER_LABEL}...", file=sys.stderr)
            # A fresh server per count, as a fresh engine: no prompt cached from the count before.
            with LlamaCppServer(gguf, args.peer_python, threads=threads) as server:
                report["peer"] = f"{server.description}, {threads} threads, a fresh server per client count"
                report["peer_sweep"].append(peer_clients(server, template, n, sessions, turns, max_tokens))
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
        print(f"plot: {plot(report, Path(args.out) / 'sweep.png')}", file=sys.stderr)
    return 0
