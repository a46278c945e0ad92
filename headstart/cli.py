"""``headstart serve | chat | calibrate | bench``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from headstart.engine import EngineConfig
from headstart.gate import DEFAULT_THRESHOLD
from headstart.prepos import PREDICTORS


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("HEADSTART_MODEL"),
                   help="short name (smollm2-135m, qwen2.5-coder-0.5b), a .gguf file or an HF folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--cache-dir", default=None, help="model cache (default $HEADSTART_CACHE or ~/.cache/headstart)")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-pre-position", action="store_true", help="no idle-time work")
    p.add_argument("--no-gate", action="store_true", help="exact paths only")
    p.add_argument("--gap-threshold", type=float, default=DEFAULT_THRESHOLD, help="gate threshold (logit gap)")
    p.add_argument("--predictor", choices=PREDICTORS, default="continuation",
                   help="what pre-positioning assumes the next message is")
    p.add_argument("--background-chunk", type=int, default=16, help="tokens per background chunk")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        pre_position=not args.no_pre_position,
        gate=not args.no_gate,
        gap_threshold=args.gap_threshold,
        predictor=args.predictor,
        background_chunk=args.background_chunk,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from headstart.server.app import ServerConfig, create_app

    config = ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        engine=engine_config(args),
        default_temperature=args.temperature,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from headstart.chat import run_chat

    return run_chat(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from headstart.calibrate import run_calibrate

    return run_calibrate(args)


def cmd_bench(args: argparse.Namespace) -> int:
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
    add_model_flags(serve)
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="talk to the model in the terminal, with the state shown")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    add_model_flags(chat)
    add_engine_flags(chat)
    chat.set_defaults(func=cmd_chat)

    cal = sub.add_parser("calibrate", help="find the gate threshold that reaches a target precision")
    cal.add_argument("--target", type=float, default=0.95, help="precision to reach")
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

    from headstart.bench.command import add_bench_arguments

    bench = sub.add_parser("bench", help="every mode side by side on one workload: TTFT, cost, precision")
    add_bench_arguments(bench)
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
