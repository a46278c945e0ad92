"""``headstart serve | chat | calibrate | bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from headstart.engine.engine import EngineConfig
from headstart.engine.gate import DEFAULT_CONFIDENCE, DEFAULT_TARGET, DEFAULT_WINDOW
from headstart.idle.prepos import DEFAULT_PREDICTOR, PREDICTORS

if TYPE_CHECKING:
    from headstart.server.app import ServerConfig


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("HEADSTART_MODEL"),
                   help="short name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), a .gguf file or an "
                        "HF folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--cache-dir", default=None, help="model cache (default $HEADSTART_CACHE or ~/.cache/headstart)")


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, all cores); on a machine shared with "
                        "other jobs fewer threads are steadier")


def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-pre-position", action="store_true", help="no idle-time work")
    p.add_argument("--no-gate", action="store_true", help="exact paths only")
    p.add_argument("--gate-target", type=float, default=DEFAULT_TARGET,
                   help="the gate fires only where the lower confidence bound of its precision reaches this")
    p.add_argument("--gate-confidence", type=float, default=DEFAULT_CONFIDENCE,
                   help="the confidence of that bound (one-sided Clopper-Pearson)")
    p.add_argument("--gate-window", type=int, default=DEFAULT_WINDOW,
                   help="recent verified answers the gate's calibration rests on, per key")
    p.add_argument("--gap-threshold", type=float, default=None,
                   help="a fixed logit-gap threshold instead: no guarantee (default: none, the guaranteed gate)")
    p.add_argument("--predictor", choices=PREDICTORS, default=DEFAULT_PREDICTOR,
                   help="what pre-positioning assumes the next message is")
    p.add_argument("--background-chunk", type=int, default=16, help="tokens per background chunk")
    p.add_argument("--kv-budget", type=parse_bytes, default=None,
                   help="bytes of KV all sessions may hold, e.g. 2GiB (default: a quarter of RAM, 40%% of free GPU)")
    p.add_argument("--spill", choices=("auto", "on", "off"), default="auto",
                   help="write evicted KV to disk and reload it (auto: on for CPU, where it is faster)")
    p.add_argument("--max-sessions", type=int, default=1000)
    p.add_argument("--idle-expiry", type=float, default=3600.0, help="seconds before an idle session is deleted")
    p.add_argument("--max-context", type=int, default=None, help="tokens per session (default: the model's)")


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MB``, ``1e9``: a byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(float(lowered))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    if not (0.0 < args.gate_target < 1.0 and 0.0 < args.gate_confidence < 1.0 and args.gate_window >= 1):
        print("headstart: --gate-target and --gate-confidence must be in (0, 1), --gate-window at least 1",
              file=sys.stderr)
        raise SystemExit(2)
    return EngineConfig(
        pre_position=not args.no_pre_position,
        gate=not args.no_gate,
        gap_threshold=args.gap_threshold,
        gate_target=args.gate_target,
        gate_confidence=args.gate_confidence,
        gate_window=args.gate_window,
        predictor=args.predictor,
        background_chunk=args.background_chunk,
        kv_budget=args.kv_budget,
        spill={"auto": None, "on": True, "off": False}[args.spill],
        max_sessions=args.max_sessions,
        idle_expiry_s=args.idle_expiry,
        max_context=args.max_context,
    )


def api_keys(args: argparse.Namespace) -> frozenset[str]:
    """Keys from --api-key (repeatable), --api-key-file and $HEADSTART_API_KEY."""
    from headstart.server.auth import read_key_file

    keys = list(args.api_key or [])
    for path in args.api_key_file or []:
        keys.extend(read_key_file(path))
    if os.environ.get("HEADSTART_API_KEY"):
        keys.append(os.environ["HEADSTART_API_KEY"])
    return frozenset(k for k in keys if k)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """What the ``serve`` flags ask of each server (one, or every replica)."""
    import dataclasses

    from headstart.server.app import ServerConfig

    set_threads(args)
    engine = dataclasses.replace(
        engine_config(args),
        max_pending=args.max_pending,
        max_queries=args.max_queries,
        context_reserve=args.context_reserve,
    )
    return ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        engine=engine,
        default_temperature=args.temperature,
        db=args.db,
        spill_dir=args.spill_dir,
        max_body_bytes=args.max_body_bytes,
        api_keys=api_keys(args),
        heartbeat_seconds=args.heartbeat,
        max_event_streams=args.max_event_streams,
        served_model_names=tuple(args.served_model_name or ()),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        from headstart.scaleout.run import serve_replicas

        return serve_replicas(args)
    import uvicorn

    from headstart.server.app import create_app
    from headstart.session.ownership import Claimed
    from headstart.session.store import SchemaError

    try:
        app = create_app(server_config(args))
    except (Claimed, SchemaError) as exc:  # another server's data, or a newer headstart's
        print(f"headstart serve: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from headstart.cli.chat import run_chat

    return run_chat(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from headstart.cli.calibrate import run_calibrate

    return run_calibrate(args)


def cmd_load(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from headstart.cli.loadtest import run_load

    report = asyncio.run(
        run_load(args.url, clients=args.clients, sessions_per_client=args.sessions, seconds=args.seconds,
                 max_tokens=args.max_tokens, think_s=args.think, api_key=args.api_key, seed=args.seed,
                 turns_per_session=args.turns_per_session)
    )
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.ok else 1

def cmd_bench(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        from headstart.bench.replicas import run_replica_bench

        return run_replica_bench(args)
    from headstart.bench.command import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headstart", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--temperature", type=float, default=1.0,
                       help="temperature when a request names none (OpenAI's default is 1.0)")
    serve.add_argument("--db", default=None,
                       help="SQLite file or postgresql://... URL for session transcripts "
                            "(default: $HEADSTART_DATA/headstart.db; '' for none)")
    serve.add_argument("--spill-dir", default=None, help="folder for spilled KV (default: $HEADSTART_DATA/spill)")
    serve.add_argument("--api-key", action="append", default=None, metavar="KEY",
                       help="require this key (repeatable); every endpoint but /health and /metrics then needs one")
    serve.add_argument("--api-key-file", action="append", default=None, metavar="PATH",
                       help="file of keys, one per line (# comments allowed); repeatable")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413")
    serve.add_argument("--max-pending", type=int, default=1024,
                       help="data entries waiting per session; past it the oldest are dropped (and counted)")
    serve.add_argument("--max-queries", type=int, default=16, help="registered questions per session")
    serve.add_argument("--context-reserve", type=int, default=512,
                       help="tokens of context kept free for questions on streaming-data sessions")
    serve.add_argument("--heartbeat", type=float, default=15.0, help="seconds between SSE heartbeats")
    from headstart.server.app import ServerConfig

    serve.add_argument("--max-event-streams", type=int, default=ServerConfig.max_event_streams,
                       help="open /v1/sessions/{id}/events streams at once; one more gets 429")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="the names requests may give as `model` (default: the model's own); the first is "
                            "the one answers carry when a request names none")
    add_threads_flag(serve)
    from headstart.scaleout.options import add_replica_flags

    add_replica_flags(serve)
    add_model_flags(serve)
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="talk to the model in the terminal, with the state shown")
    chat.add_argument("--url", default=None,
                      help="talk to a running server (e.g. http://127.0.0.1:8000) instead of loading the model here")
    chat.add_argument("--api-key", default=os.environ.get("HEADSTART_API_KEY"), help="key for --url")
    chat.add_argument("--session", default=None, help="session id (default: a new one per chat)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    add_threads_flag(chat)
    add_model_flags(chat)
    add_engine_flags(chat)
    chat.set_defaults(func=cmd_chat)

    cal = sub.add_parser("calibrate", help="find the gate threshold whose precision bound reaches a target")
    cal.add_argument("--target", dest="gate_target", type=float, default=argparse.SUPPRESS,
                     help="the same as --gate-target")
    cal.add_argument("--trace", default=None, help="JSONL trace (one session per line); default: generated")
    cal.add_argument("--workload", choices=("agent", "stream", "chat"), default="agent",
                     help="generated workload when no trace is given")
    cal.add_argument("--gaps", default=None, help="idle gaps (default: none, but each turn waits for idle work)")
    cal.add_argument("--clients", type=int, default=2, help="sessions in flight at once")
    cal.add_argument("--sessions", type=int, default=6)
    cal.add_argument("--turns", type=int, default=6)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--max-tokens", type=int, default=24)
    cal.add_argument("--json", default=None, help="write the calibration here")
    add_model_flags(cal)
    add_engine_flags(cal)
    cal.set_defaults(func=cmd_calibrate)
    load = sub.add_parser("load", help="a bounded load test against a running server")
    load.add_argument("--url", default="http://127.0.0.1:8000")
    load.add_argument("--clients", type=int, default=4)
    load.add_argument("--sessions", type=int, default=2, help="sessions per client")
    load.add_argument("--seconds", type=float, default=30.0)
    load.add_argument("--max-tokens", type=int, default=8)
    load.add_argument("--think", type=float, default=0.5, help="most seconds a client waits between turns")
    load.add_argument("--api-key", default=None)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--turns-per-session", type=int, default=None,
                      help="turns per conversation, then a client starts a fresh session (default: no limit)")
    load.set_defaults(func=cmd_load)

    from headstart.bench.command import add_bench_arguments

    bench = sub.add_parser("bench", help="every mode side by side on one workload: TTFT, cost, precision")
    add_bench_arguments(bench)
    from headstart.bench.replicas import add_replica_bench_arguments

    add_replica_bench_arguments(bench)
    add_model_flags(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
