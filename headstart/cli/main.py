"""``headstart serve | chat | calibrate | bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from headstart.server.flags import add_engine_flags, add_model_flags, add_serve_flags, add_threads_flag, server_config


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
    add_serve_flags(serve)
    from headstart.scaleout.options import add_replica_flags

    add_replica_flags(serve)
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
